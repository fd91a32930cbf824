"""One module per subcommand; each exposes ``register(app)``."""

from lorafleet.commands import (
    aggregate,
    client,
    demo,
    distribute,
    export,
    fleet,
    models,
    profile,
    serve,
    train,
)

COMMAND_MODULES = [export, profile, train, aggregate, distribute, serve, client, fleet, models, demo]
