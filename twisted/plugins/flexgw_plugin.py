"""twistd plugins: `twistd flexgw --conf DIR` runs the gateway; `--reactor flexgw` is its reactor."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

flexgw = ServiceMaker(
    "flexgw",
    "flexgw.tap",
    "A Flex Gateway (Local Mode) compatible API gateway",
    "flexgw",
)

#: `twistd --reactor flexgw`: Twisted's epoll reactor without the per-event log context
#: (flexgw/compat/epollreactor.py); `twistd flexgw` installs it unless --reactor names another.
flexgw_reactor = Reactor(
    "flexgw",
    "flexgw.compat.epollreactor",
    "epoll reactor without the per-event log context (flexgw's default)",
)
