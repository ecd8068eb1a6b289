# Site sydney: its upstream broker pair, and the beacon topics its sensors use.
mosquitto:
  bridges:
    upstream:
      addresses: ['mqtt-a.sydney.example.internal:8883', 'mqtt-b.sydney.example.internal:8883']   # failover order
      remote_clientid: {{ grains['id'] }}
      remote_username: {{ grains['id'] }}
      remote_password: CHANGE-ME-bridge
      local_username: bridge
      restart_timeout: [5, 60]
      tls:
        cafile: /etc/tributary/tls/upstream-ca.pem
      topics:
        - {topic: 'sensors/#', direction: out, qos: 1, remote_prefix: 'site/sydney/{{ grains['id'] }}/'}
        - {topic: 'cmd/#', direction: in, qos: 1, remote_prefix: 'site/sydney/{{ grains['id'] }}/'}
tributary:
  sites:
    sydney:
      beacons:
        tributary_mqtt:
          topics:
            - {topic: 'sensors/{sensor}/{metric}', format: number, unit: C}
