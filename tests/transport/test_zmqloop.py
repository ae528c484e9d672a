"""BatchReader's edge handling over real zmq sockets: a send can consume
ZMQ_FD's edge of input that arrived meanwhile; that input must still be
read, whether the send saw it (sent() drains) or it comes later (the FD
signals again)."""

import asyncio
import time

import zmq

from nrm.transport.zmqloop import BatchReader


def test_input_behind_a_send_is_read_and_later_input_still_wakes_the_reader():
    async def scenario():
        ctx = zmq.Context()
        ours, theirs = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        theirs.bind("inproc://edge")
        ours.connect("inproc://edge")
        got = []
        loop = asyncio.get_running_loop()
        reader = BatchReader(loop, ours, lambda frames: got.append(bytes(frames[0])))
        try:
            for round_ in range(50):
                theirs.send(b"a%d" % round_)    # in our pipe; ZMQ_FD signalled
                time.sleep(0.002)           # past zmq's command throttle, loop not run
                ours.send(b"ping")          # processes commands: the signal is consumed
                reader.sent()
                for _ in range(200):
                    if len(got) == 2 * round_ + 1:
                        break
                    await asyncio.sleep(0.001)
                assert got[-1:] == [b"a%d" % round_], got[-3:]
                theirs.recv()
                theirs.send(b"b%d" % round_)    # after the check: ZMQ_FD must fire
                for _ in range(2000):
                    if len(got) == 2 * round_ + 2:
                        break
                    await asyncio.sleep(0.001)
                assert got[-2:] == [b"a%d" % round_, b"b%d" % round_], got[-4:]
        finally:
            reader.close()
            ours.close(linger=0)
            theirs.close(linger=0)
            ctx.term()
    asyncio.run(scenario())


def test_a_check_after_the_socket_closed_is_harmless():
    async def scenario():
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        reader = BatchReader(asyncio.get_running_loop(), sock, lambda frames: None)
        reader.close()
        sock.close(linger=0)
        reader.sent()       # a reply queued before shutdown, sent after it
        ctx.term()
    asyncio.run(scenario())
