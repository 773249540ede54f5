"""When a record was made: the one UTC time stamp of verdicts, enrolments, calibrations and comparisons.

At the ground floor so that every layer that writes a record (pipeline verdicts, the live input,
the device registry, forensic comparisons) takes its time stamps from here.
"""

from __future__ import annotations

import time


def utc_timestamp() -> str:
    """Now as an ISO 8601 UTC time stamp with milliseconds (``judged_at``, ``enrolled_at``, ...)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
