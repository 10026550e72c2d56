"""Broker outages through real processes: a Tansu broker SIGKILLed under a running worker + ranker.

The ranker reads only the store, so it keeps answering while the broker is away; the worker
keeps retrying, and once a broker listens on the same address again (empty: Tansu is memory
only, so its topics, consumer group and committed offsets are gone) it rejoins, and its
BrokerLossGuard (fusionrec/stack.py) re-reads every partition from the start, without the
worker being restarted. `fusionrec up` also restarts an embedded broker that died, stops within
seconds whatever its broker is doing, and leaves no broker behind when it is SIGKILLed. Items are
text only: encoding is not what is under test, and MiniLM is the cheapest encoder.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from fusionrec import store
from fusionrec.broker import EmbeddedBroker, wait_for_port
from fusionrec.launcher import ChildStack, spawn_stack
from fusionrec.publisher import Publisher
from fusionrec.settings import WorkerSettings, load_settings
from fusionrec.stack import EXIT_OVERDUE
from serving.client import RankerClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TEXT_ONLY = {"FUSIONREC_ENCODERS__ENABLED": '["text"]', "FUSIONREC_ENCODERS__THREADS": "1"}
# Longer than the worker's broker_session_timeout (8 s): its group session lapses too.
OUTAGE_S = 10.0
# From the broker's return to a new item served; ~4 s seen (half the session timeout is
# Tansu's first group join), the rest is room for a loaded 2-core machine.
RESUME_S = 60.0


def item(item_id: str) -> dict:
    return {"id": item_id, "title": f"Item {item_id}", "description": f"The item called {item_id}."}


def like(user: str, item_id: str) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "item_id": item_id,
        "type": "like",
        "timestamp": time.time(),
    }


def known(client: RankerClient, item_id: str) -> bool:
    try:
        client.similar(item_id, 1, explain=False)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False


def wait(child: ChildStack, what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until check() holds; fails if the stack process dies meanwhile (never restarted)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert child.process.poll() is None, f"the stack died:\n{child.log_tail()}"
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{child.log_tail()}")


def publish(bootstrap: str, kind: str, docs: list[dict]) -> None:
    """A fresh producer each time: the test's own client is not what is under test."""
    publisher = Publisher(load_settings(kafka={"bootstrap": bootstrap}))
    try:
        publisher.publish_all(kind, docs)  # type: ignore[arg-type]
    finally:
        publisher.close()


@pytest.fixture
def running(
    tmp_path: Path,
) -> Iterator[Callable[[dict[str, str]], tuple[ChildStack, RankerClient]]]:
    """Starts `fusionrec up` (text only) with extra settings, serving; stops it afterwards."""
    started: list[tuple[ChildStack, RankerClient]] = []

    def start(env: dict[str, str]) -> tuple[ChildStack, RankerClient]:
        child = spawn_stack(tmp_path, {**TEXT_ONLY, "FUSIONREC_MEDIA__ROOT": str(tmp_path), **env})
        client = RankerClient(child.target, timeout=5)
        started.append((child, client))
        wait(child, "ranker serving", client.serving, timeout=300)
        return child, client

    yield start
    for child, client in started:
        client.close()
        child.stop()
        print(child.log_tail(3000))


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A broker outside the stack. Ask for it before `running`: the worker is stopped first (a
    worker stopped with no broker to leave its group hangs until killed)."""
    with EmbeddedBroker() as broker:
        yield broker


def test_worker_and_ranker_ride_out_a_broker_restart(broker: EmbeddedBroker, running) -> None:
    # Worker + ranker in one process, the broker outside it (as benchmarks/chaos.py runs).
    child, client = running(
        {"FUSIONREC_KAFKA__BOOTSTRAP": broker.bootstrap, "FUSIONREC_KAFKA__EMBEDDED": "true"}
    )
    # Several items, so some partition's offsets pass the ones the new broker will give.
    before = [f"before-{k}" for k in range(6)]
    publish(broker.bootstrap, "items", [item(i) for i in before])
    wait(child, "the first items", lambda: all(known(client, i) for i in before), 60)

    assert broker.process is not None
    broker.process.send_signal(signal.SIGKILL)
    broker.process.wait()
    lines_then = len(child.log.read_text(errors="replace").splitlines())
    slowest = 0.0
    deadline = time.monotonic() + OUTAGE_S
    while time.monotonic() < deadline:
        assert child.process.poll() is None, f"the worker died:\n{child.log_tail()}"
        start = time.monotonic()
        assert client.health() == "SERVING"
        ranking = client.recommend(f"new-{uuid.uuid4()}", 10)
        assert set(before) <= {i.item_id for i in ranking.items}
        assert known(client, before[0])
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.5)
    # Served from the store: no call waits on the broker.
    assert slowest < 2.0, slowest
    logged = len(child.log.read_text(errors="replace").splitlines()) - lines_then
    # The outage is logged, but not each of aiokafka's retries (~75 lines/s unthrottled).
    assert 0 < logged < 150, child.log_tail()

    broker.start()  # the same port, empty
    restarted = time.monotonic()
    publish(broker.bootstrap, "items", [item("after")])
    publish(broker.bootstrap, "events", [like("reader", "after")])
    wait(child, "the item published after the restart", lambda: known(client, "after"), RESUME_S)
    item_s = time.monotonic() - restarted
    wait(
        child,
        "the event published after the restart",
        lambda: not client.recommend("reader", 1).cold_start,
        RESUME_S,
    )
    event_s = time.monotonic() - restarted
    wait(
        child,
        "the worker to re-read the new topics from their start",
        lambda: "re-reading" in child.log_tail(20_000),
        RESUME_S,
    )
    print(
        f"outage {OUTAGE_S:.0f} s, slowest ranker call {slowest * 1000:.0f} ms, "
        f"{logged} log lines; broker restart -> new item served {item_s:.1f} s, "
        f"-> event folded {event_s:.1f} s"
    )


def tansu_pid(child: ChildStack) -> int:
    """The broker `fusionrec up` started: its child process listening on the broker port."""
    listener = f"tcp://127.0.0.1:{child.broker_port}".encode()
    tasks = Path(f"/proc/{child.process.pid}/task")
    if not tasks.is_dir():
        pytest.skip("needs /proc to find the embedded broker's process")
    for task in tasks.iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            pytest.skip("needs /proc/<pid>/task/<tid>/children to find the embedded broker")
        for pid in pids:
            if listener in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no child of the stack listens on {listener.decode()}")


def test_up_restarts_its_embedded_broker(running, tmp_path: Path) -> None:
    child, client = running({})
    publish(child.bootstrap, "items", [item("before")])
    wait(child, "the first item", lambda: known(client, "before"), 60)

    os.kill(tansu_pid(child), signal.SIGKILL)
    killed = time.monotonic()
    assert known(client, "before")
    wait(child, "the loss to be logged", lambda: "LOST" in child.log_tail(20_000), 30)
    wait_for_port("127.0.0.1", child.broker_port, 30)
    # A bad message first: dead-letters must exist again on the new broker for it to land.
    publisher = Publisher(load_settings(kafka={"bootstrap": child.bootstrap}))
    try:
        publisher.send_raw("items", b"k", b"{not json")
        publisher.publish_all("items", [item("after")])
    finally:
        publisher.close()
    wait(child, "the item published after the restart", lambda: known(client, "after"), RESUME_S)
    print(f"broker SIGKILLed -> new item served {time.monotonic() - killed:.1f} s")

    # The worker re-reads the new broker's topics from their start, the bad message included:
    # its dead letter must not be sent twice (streams/deadletters.py).
    wait(child, "the re-read", lambda: "re-reading" in child.log_tail(20_000), RESUME_S)
    time.sleep(5)  # the re-read batches go through
    consumer = KafkaConsumer(
        "dead-letters",
        bootstrap_servers=child.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,  # gives up after this long with nothing new
    )
    try:
        letters = [(m.key, json.loads(m.value)) for m in consumer]
    finally:
        consumer.close()
    bad = [(key, doc) for key, doc in letters if "invalid JSON" in doc["reason"]]
    assert len(bad) == 1, f"{len(bad)} dead letters for the bad message: {letters}"
    assert bad[0][0] == bad[0][1]["id"].encode()  # keyed by its id: consumers dedupe by key


def dead_letters(bootstrap: str) -> list[tuple[bytes, dict]]:
    """Every letter on the dead-letters topic, with its key."""
    consumer = KafkaConsumer(
        "dead-letters",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # Tansu holds a fetch for half of it, data or not
        consumer_timeout_ms=1000,  # gives up after this long with nothing new
    )
    try:
        return [(m.key, json.loads(m.value)) for m in consumer]
    finally:
        consumer.close()


def rejected_then_killed(child: ChildStack, bootstrap: str, bad: bytes) -> tuple[dict, bool]:
    """Publish `bad`, SIGKILL the worker as soon as its dead letter is on the broker; the letter,
    and whether the worker had not committed past the message yet (Faust commits every 2.8 s,
    so the kill, tens of ms after the letter, nearly always lands before)."""
    consumer = KafkaConsumer(
        "dead-letters",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    try:
        consumer.poll(timeout_ms=500)  # connected and assigned before the clock starts
        publisher = Publisher(load_settings(kafka={"bootstrap": bootstrap}))
        try:
            publisher.send_raw("items", b"k", bad)
        finally:
            publisher.close()
        deadline = time.monotonic() + 30
        letter = None
        while letter is None:
            assert time.monotonic() < deadline, f"no dead letter:\n{child.log_tail()}"
            for records in consumer.poll(timeout_ms=20).values():
                for m in records:
                    doc = json.loads(m.value)
                    if base64.b64decode(doc["value_base64"]) == bad:
                        letter = doc
        child.process.send_signal(signal.SIGKILL)
        child.process.wait()
    finally:
        consumer.close()
    source = letter["source"]
    group = KafkaConsumer(bootstrap_servers=bootstrap, group_id="fusionrec")  # joins nothing
    try:
        committed = group.committed(TopicPartition(source["topic"], source["partition"]))
    finally:
        group.close()
    return letter, committed is None or committed <= source["offset"]


def test_a_restarted_worker_sends_a_dead_letter_once(broker: EmbeddedBroker, running) -> None:
    # Issue 7: a worker SIGKILLed after it sent a letter, before it committed the offset, reads
    # the bad message again when it restarts; it finds the letter's id on the topic and does not
    # send it twice (streams/deadletters.py recover_sent).
    env = {
        "FUSIONREC_KAFKA__BOOTSTRAP": broker.bootstrap,
        "FUSIONREC_KAFKA__EMBEDDED": "true",
        "FUSIONREC_LOG_LEVEL": "INFO",  # to see the skip
    }
    for attempt in range(3):  # again, should the commit have beaten the kill
        child, _ = running(env)
        letter, uncommitted = rejected_then_killed(
            child, broker.bootstrap, b"{not json %d" % attempt
        )
        if uncommitted:
            break
    assert uncommitted, "the worker committed before each kill: nothing would be read again"

    child, _ = running(env)  # the same data directory, a fresh process
    # It reads the bad message again: "already dead-lettered (id) from items[p]@o", or without
    # the recovery "dead-letter from items[p]@o" and a second letter.
    where = "{topic}[{partition}]@{offset}".format(**letter["source"])
    wait(child, f"the re-read of {where}", lambda: where in child.log_tail(200_000), 60)
    letters = [
        (key, doc) for key, doc in dead_letters(broker.bootstrap) if doc["id"] == letter["id"]
    ]
    assert len(letters) == 1, f"{len(letters)} dead letters for one bad message: {letters}"
    assert letters[0][0] == letter["id"].encode()
    assert "already dead-lettered" in child.log_tail(200_000)
    print(f"killed before the commit at attempt {attempt + 1}")


# Stopping it, whatever its broker is doing. SIGTERM with the broker gone (SIGKILLed outside the
# stack, or the embedded one SIGKILLed and being restarted) or frozen (SIGSTOPped: it accepts
# connections and answers nothing) ends the process within STOP_BOUND_S (the bound; the
# stack's own deadline is worker.stop_deadline_s), and what the worker wrote is in the store
# afterwards.
# A SIGKILLed stack takes its embedded broker along (no orphan Tansu): the first one, and one its
# supervisor restarted.
STOP_BOUND_S = 15.0
assert WorkerSettings().stop_deadline_s < STOP_BOUND_S


def gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sigterm(child: ChildStack) -> tuple[float, int]:
    """Seconds from SIGTERM to the stack's exit, and its exit code."""
    start = time.monotonic()
    child.process.send_signal(signal.SIGTERM)
    try:
        code = child.process.wait(STOP_BOUND_S + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {STOP_BOUND_S + 30:.0f} s after SIGTERM:\n{child.log_tail()}"
        ) from None
    return time.monotonic() - start, code


def stored(state: Path, item_id: str) -> bool:
    """Whether the item is in the stack's store (opened after the stack has gone)."""
    settings = load_settings(data_dir=state)
    client = store.connect(settings)
    try:
        points = client.retrieve(settings.qdrant.items_collection, [store.item_point_id(item_id)])
        return len(points) == 1
    finally:
        client.close()


def onboarded(child: ChildStack, client, item_id: str, bootstrap: str | None = None) -> None:
    publish(bootstrap or child.bootstrap, "items", [item(item_id)])
    wait(child, f"item {item_id}", lambda: known(client, item_id), 60)


def test_sigterm_with_the_broker_gone_exits_cleanly(
    broker: EmbeddedBroker, running, tmp_path: Path
) -> None:
    # Before the fix: hung for good (aiokafka's stop raised CancelledError in Faust's consumer
    # thread, and the worker waited for that thread forever).
    child, client = running(
        {"FUSIONREC_KAFKA__BOOTSTRAP": broker.bootstrap, "FUSIONREC_KAFKA__EMBEDDED": "true"}
    )
    onboarded(child, client, "kept", broker.bootstrap)
    assert broker.process is not None
    broker.process.send_signal(signal.SIGKILL)
    broker.process.wait()
    time.sleep(2)  # the worker's clients notice and start retrying
    took, code = sigterm(child)
    print(f"SIGTERM with the broker gone: exit {code} after {took:.1f} s")
    assert took < STOP_BOUND_S and code == 0, child.log_tail()
    assert stored(tmp_path / "state", "kept")


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_sigterm_with_the_embedded_broker_away_exits(running, tmp_path: Path, fault: str) -> None:
    child, client = running({})
    onboarded(child, client, "kept")
    pid = tansu_pid(child)
    # Killed: its supervisor restarts it, and the SIGTERM lands in the middle of that. Frozen:
    # it is alive, listens and answers nothing, so the worker's stop waits on Kafka requests
    # until the deadline ends it.
    os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    took, code = sigterm(child)
    print(f"SIGTERM with the embedded broker {fault}: exit {code} after {took:.1f} s")
    assert took < STOP_BOUND_S and code in (0, EXIT_OVERDUE), child.log_tail()
    assert wait_gone(pid), f"the {fault} broker {pid} outlived the stack"
    assert stored(tmp_path / "state", "kept")


def test_sigkilled_stack_takes_its_broker_along(running) -> None:
    child, _ = running({})
    pid = tansu_pid(child)
    child.process.send_signal(signal.SIGKILL)
    child.process.wait()
    assert wait_gone(pid), f"the broker {pid} outlived the SIGKILLed stack"


SUPERVISED = """
import time
from fusionrec.broker import EmbeddedBroker
broker = EmbeddedBroker().start()
broker.supervise(interval=0.1)
first = broker.process
print(first.pid, flush=True)
while broker.process in (None, first):
    time.sleep(0.05)
print(broker.process.pid, flush=True)
time.sleep(600)
"""


def test_sigkilled_parent_takes_a_restarted_broker_along() -> None:
    # A restarted broker is forked by the supervisor thread, not the main thread: PDEATHSIG
    # follows the forking thread, so this is the case to check (no model to load: cheap).
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see whether the broker is gone")
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SUPERVISED)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    second = None
    try:
        assert parent.stdout is not None
        os.kill(int(parent.stdout.readline()), signal.SIGKILL)
        second = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        assert wait_gone(second), f"the restarted broker {second} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if second is not None and not gone(second):
            os.kill(second, signal.SIGKILL)  # no orphan left behind by a failed test
