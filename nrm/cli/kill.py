"""nrm kill: kill every process of a container."""

from nrm.cli.common import client

NAME = "kill"
HELP = "kill a container and all its tasks"


def add_arguments(p) -> None:
    p.add_argument("container")


def execute(args) -> int:
    data = client(args).kill(args.container)
    print(f"killed container {data['container']} ({data['tasks']} tasks)")
    return 0
