"""Users and groups, as the daemon needs them.

Every request is authorized by uid; a task of another user runs as that
user with the user's supplementary groups, in a working directory the user
may enter; the power group grants power commands. These answers come from
passwd and group lookups, which go through NSS (files, LDAP, ...) and may
be slow: the passwd entry is cached briefly here, for all of them.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import time
from typing import Dict, List

_USER_CACHE_S = 30.0
_users: Dict[int, tuple] = {}


class AccessDenied(Exception):
    """A user that may not run as asked; ``code`` is the reply's code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _user(uid: int):
    """passwd lookups go through NSS (files, LDAP...): cache them briefly."""
    now = time.monotonic()
    hit = _users.get(uid)
    if hit is not None and now - hit[0] < _USER_CACHE_S:
        return hit[1]
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        pw = None
    if len(_users) > 1024:
        _users.clear()
    _users[uid] = (now, pw)
    return pw


def user_name(uid: int) -> str:
    pw = _user(uid)
    return pw.pw_name if pw else str(uid)


def groups_of(uid: int, gid: int) -> List[int]:
    """The groups a task of ``uid`` running with primary group ``gid`` gets."""
    pw = _user(uid)
    if pw is None:
        raise AccessDenied("denied", f"uid {uid} has no passwd entry")
    return os.getgrouplist(pw.pw_name, gid)


def in_group(uid: int, gid: int, group_name: str) -> bool:
    """Whether a requester (``uid``, primary group ``gid``) belongs to the
    group named ``group_name``: as its primary group, or as a member in the
    group database. An unknown group or user belongs to nothing."""
    try:
        gr = grp.getgrnam(group_name)
    except KeyError:
        return False
    if gid == gr.gr_gid:
        return True
    pw = _user(uid)
    return pw is not None and gr.gr_gid in os.getgrouplist(pw.pw_name, pw.pw_gid)


def check_cwd_access(cwd: str, uid: int, gids: List[int]) -> None:
    """Refuse a cwd the user could not enter: the child chdirs before it
    drops root, so without this check a user could start in any directory."""
    path = "/"
    for part in [p for p in os.path.abspath(cwd).split("/") if p]:
        path = os.path.join(path, part)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise AccessDenied("cwd", f"working directory {cwd}: {exc.strerror}") from None
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise AccessDenied("cwd", f"working directory {cwd}: permission denied for uid {uid}")
