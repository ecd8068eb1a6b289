# Roles (grain `role`) to states. The file tree is served with two roots, in this order:
#   file_roots: {base: [<repo>/salt/states, <repo>/salt]}
# so states are `mosquitto`, `docker`, `tributary.*` and custom modules `salt://_modules`.
base:
  'role:gateway':
    - match: grain
    - mosquitto            # package or container mode (pillar mosquitto:mode)
    - tributary.gateway
  'role:syndic':
    - match: grain
    - tributary.syndic
  'role:master':
    - match: grain
    - tributary.master
  'role:docker-host':
    - match: grain
    - docker
