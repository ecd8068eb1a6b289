"""Salt's reactor on the top master: what an alert event may make Salt do.

The reactor SLS files under ``salt/reactor/`` are thin: they hand the event's tag and data to
:func:`saltext.tributary.reactor.actions.plan`, which answers with reactions built only from
the trusted action table in the master's config (``tributary_reactor``). Event data chooses
nothing but values checked against names: the alert's own gateway id, and a device name the
table's ``devices`` globs allow.
"""
