"""One module per subcommand; each exposes ``register(app)``."""

from lorafleet.commands import (
    aggregate,
    cache,
    certs,
    client,
    data,
    demo,
    distribute,
    export,
    fleet,
    gateway,
    models,
    package,
    profile,
    serve,
    train,
)

COMMAND_MODULES = [export, package, profile, data, train, aggregate, distribute, serve, client, gateway, certs, fleet,
                   models, cache, demo]
