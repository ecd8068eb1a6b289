# Every gateway: a local broker the sensors publish to, bridged to the site's upstream.
mosquitto:
  mode: package
  max_queued_messages: 200000      # store and forward through hours of upstream outage
  listeners:
    - port: 1883
      address: 127.0.0.1
    - port: 8883
      tls:
        cafile: /etc/tributary/tls/ca.pem
        certfile: /etc/tributary/tls/gateway.pem
        keyfile: /etc/tributary/tls/gateway.key
  users:
    tributary: {password: CHANGE-ME-gw}   # the tributary_mqtt beacon
    sensor: {password: CHANGE-ME-sensor}  # field devices
  acl:
    sensor:
      - {topic: 'sensors/#', access: write}
    tributary:
      - {topic: '#', access: read}
    bridge:
      - {topic: 'sensors/#', access: read}
      - {topic: 'cmd/#', access: write}
