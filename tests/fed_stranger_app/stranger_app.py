"""Code a stranger wants to run on the server and on every device (tests only)."""

from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    marker = str(context.run_config["marker"])
    Path(marker + ".server").write_text("the stranger's ServerApp ran\n")
    messages = [Message(RecordDict({"config": ConfigRecord({"hello": 1})}), dst_node_id=n, message_type="query")
                for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=60)
    Path(marker + ".replies").write_text("".join((r.error.reason if r.has_error() else "ran") + "\n" for r in replies))


@client.query()
def query(message, context):
    Path(str(context.run_config["marker"]) + ".client").write_text("the stranger's ClientApp ran\n")
    return Message(RecordDict(), reply_to=message)
