# Example fleet: two sites (brisbane, sydney) behind one top master and one syndic each.
# Minions carry the grains `role` (gateway | syndic | master) and `site`.
base:
  '*':
    - fleet
  'role:master':
    - match: grain
    - roles.master
  'role:syndic':
    - match: grain
    - roles.syndic
  'role:gateway':
    - match: grain
    - roles.gateway
  'site:brisbane':
    - match: grain
    - sites.brisbane
  'site:sydney':
    - match: grain
    - sites.sydney
