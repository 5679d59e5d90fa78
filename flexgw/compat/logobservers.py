"""The observers a twisted.logger publisher sends to (to wrap each in a level filter).

twistd installs its log observers (the --logfile / --syslog one) after the plug-in's
makeService has run, through `globalLogBeginner.beginLoggingTo`, and keeps no public handle on
them; `LogPublisher` can add and remove an observer but not list them.

Private API: `twisted.logger.LogPublisher._observers`. Kept: no public way to list them.
"""

from __future__ import annotations

from typing import Any


def observers(publisher: Any) -> list[Any]:
    """A copy of the observers `publisher` currently sends each event to."""
    return list(publisher._observers)
