tributary:
  syndic:
    syndic_master: top.example.internal
