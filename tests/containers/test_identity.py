"""Users and groups (nrm/containers/identity.py) against this machine's
real passwd and group databases: the power group's membership test that
Daemon.may_set_power relies on."""

import grp
import pwd

import pytest

from nrm.containers.identity import AccessDenied, groups_of, in_group, user_name


def test_primary_group_counts_and_others_do_not():
    nobody = pwd.getpwnam("nobody")
    primary = grp.getgrgid(nobody.pw_gid).gr_name
    assert in_group(nobody.pw_uid, nobody.pw_gid, primary)
    assert not in_group(nobody.pw_uid, nobody.pw_gid, "root")
    assert not in_group(nobody.pw_uid, nobody.pw_gid, "no-such-group-nrm")


def test_the_requesters_gid_counts_even_when_it_is_not_the_users():
    nobody = pwd.getpwnam("nobody")
    assert in_group(nobody.pw_uid, 0, "root")
    assert not in_group(4_000_000, 65534, "root")        # no passwd entry, not its gid


def test_membership_listed_in_the_group_database_counts():
    for gr in grp.getgrall():
        for member in gr.gr_mem:
            try:
                pw = pwd.getpwnam(member)
            except KeyError:
                continue
            if pw.pw_gid != gr.gr_gid:
                assert in_group(pw.pw_uid, pw.pw_gid, gr.gr_name)
                assert gr.gr_gid in groups_of(pw.pw_uid, pw.pw_gid)
                return
    pytest.skip("no user here is a listed member of a group other than its own")


def test_unknown_users_have_a_name_but_no_groups():
    assert user_name(4_000_000) == "4000000"
    with pytest.raises(AccessDenied) as err:
        groups_of(4_000_000, 0)
    assert err.value.code == "denied"
