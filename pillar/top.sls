# Example fleet: two sites (brisbane, sydney) behind one top master and one syndic each.
#
# Secrets are targeted by minion id, never by grain: grains are whatever a minion sets on
# itself, so a gateway running `grains.setval role master` must not receive the relay's
# Elasticsearch credentials, nor one site's bridge passwords by claiming another site. Minion
# ids are authenticated by their keys; name hosts <role>-<site>-<n> (or use master-side
# nodegroups of explicit ids: `match: nodegroup`).
base:
  '*':
    - fleet
  'top.example.internal':     # the top master's own minion id
    - roles.master
  'syndic-*':
    - roles.syndic
  'gw-*':
    - roles.gateway
  'gw-brisbane-*':
    - sites.brisbane
  'gw-sydney-*':
    - sites.sydney
