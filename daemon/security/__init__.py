"""Who may call the daemon: API keys in the OS keyring, their checks and scopes, the network-bind
policy, and the Host / CORS / request-limit hardening."""
