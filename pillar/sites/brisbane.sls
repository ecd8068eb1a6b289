# Site brisbane: its upstream broker pair, and the beacon topics its sensors use.
mosquitto:
  bridges:
    upstream:
      addresses: ['mqtt-a.brisbane.example.internal:8883', 'mqtt-b.brisbane.example.internal:8883']   # failover order
      remote_clientid: {{ grains['id'] }}
      remote_username: {{ grains['id'] }}
      remote_password: CHANGE-ME-bridge
      local_username: bridge
      restart_timeout: [5, 60]
      tls:
        cafile: /etc/tributary/tls/upstream-ca.pem
      topics:
        - {topic: 'sensors/#', direction: out, qos: 1, remote_prefix: 'site/brisbane/{{ grains['id'] }}/'}
        - {topic: 'cmd/#', direction: in, qos: 1, remote_prefix: 'site/brisbane/{{ grains['id'] }}/'}
tributary:
  sites:
    brisbane:
      beacons:
        tributary_mqtt:
          topics:
            - {topic: 'sensors/{sensor}/{metric}', format: number, unit: C}
