"""nrm list: containers you may see."""

from nrm.cli.common import add_json_flag, client, show

NAME = "list"
HELP = "list containers"


def add_arguments(p) -> None:
    add_json_flag(p)


def execute(args) -> int:
    return show(args, client(args).list(), render)


def render(containers) -> None:
    print(f"{'CONTAINER':14} {'USER':10} {'NAME':16} {'CPUS':10} {'MEMS':6} {'POWER':8} TASKS")
    for c in containers:
        cpus = ",".join(str(x) for x in c["cpus"])
        mems = ",".join(str(x) for x in c["mems"])
        print(f"{c['id']:14} {c['user']:10} {c['name'][:16]:16} {cpus:10} {mems:6} "
              f"{c['power']:8} {len(c['tasks'])}")
