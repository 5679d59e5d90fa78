"""twistd plugin: `twistd flexgw --conf DIR` runs the gateway."""

from twisted.application.service import ServiceMaker

flexgw = ServiceMaker(
    "flexgw",
    "flexgw.tap",
    "A Flex Gateway (Local Mode) compatible API gateway",
    "flexgw",
)
