#!py
"""Tributary alert reactions: ``tributary/alert/<rule>/<firing|resolved>`` on the top master.

Installed by the ``tributary.master`` state (pillar ``tributary:master:reactor``), with the
``reactor:`` mapping and the action table (``tributary_reactor``) in master.d. Python, not
Jinja over YAML: event data never becomes SLS text, so a value a gateway chose (a sensor name)
cannot add keys, targets or functions. The reactions come from the trusted action table only;
see :mod:`saltext.tributary.reactor.actions`.
"""


def run():
    from saltext.tributary.reactor.actions import reactions

    return reactions(__opts__, tag, data)  # tag and data: given by the reactor
