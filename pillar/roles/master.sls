tributary:
  master:
    relay:
      elasticsearch:
        hosts: ['https://es.example.internal:9200']
        username: tributary-relay
        password: CHANGE-ME-es
        ca_certs: /etc/tributary/es-ca.pem
      index_prefix: tributary
      trusted_syndics: [syndic-brisbane, syndic-sydney]   # key sets from these only
