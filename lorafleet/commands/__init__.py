"""One module per subcommand; each exposes ``register(app)``."""

from lorafleet.commands import (
    aggregate,
    certs,
    client,
    demo,
    distribute,
    export,
    fleet,
    gateway,
    models,
    profile,
    serve,
    train,
)

COMMAND_MODULES = [export, profile, train, aggregate, distribute, serve, client, gateway, certs, fleet, models,
                   demo]
