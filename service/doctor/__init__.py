"""``provisioner doctor``: is this deployment healthy, and if not, what should the operator do?

Each check reads what is true now (broker, Redis, database and migrations, queue depths, the
outbox backlog, the per-tenant locks, sagas nobody is running) and answers with a
:class:`Finding`: ``ok`` or not, one line saying what was seen, and for a problem the command
that fixes it. A source that does not answer is itself a finding, never a crash, so the doctor
works best exactly when something is down. It changes nothing.
"""

from service.doctor.examination import Doctor
from service.doctor.findings import Finding, as_json, healthy

__all__ = ["Doctor", "Finding", "as_json", "healthy"]
