"""Real federations on Flower's own processes: ``lorafleet serve``, ``lorafleet client``, the device gateway,
the app guard and the certificates they use (docs/SECURITY.md)."""

from lorafleet.federation.processes import (
    APP_DIR,
    FederationError,
    Tls,
    free_port,
    parse_address,
    run_client,
    serve,
)

__all__ = ["APP_DIR", "FederationError", "Tls", "free_port", "parse_address", "run_client", "serve"]
