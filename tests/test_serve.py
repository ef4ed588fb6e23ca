"""`elder serve`: a real server process on loopback, edited and asked over HTTP, killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from elder.cli import app
from elder.serve import spawn

pytest.importorskip("fastapi")

ELDER = {"first_layer": 3, "num_layers": 2, "num_experts": 8, "rank": 4, "lr": 3e-2,
         "router_lr": 5e-2, "iterations": 200, "batch_size": 2, "key_layer": 1, "key_threshold": 0.9}
EDITS = [{"id": "zq", "prompt": "Where does Zorbulaq live? In", "target": " Quem", "subject": "Zorbulaq"},
         {"id": "mw", "prompt": "The colour of Mirtavej is", "target": " wox", "subject": "Mirtavej"}]
UNRELATED = "Where does Pennimore live? In"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


class Server:
    """An `elder serve` process on a free loopback port."""

    def __init__(self, memory: Path, model: Path, token: str | None = None, env: dict | None = None,
                 settings: dict | None = None, options: tuple[str, ...] = ()) -> None:
        args = ["--memory", str(memory), "--model", str(model), *options]
        if not (memory / "journal.sqlite3").exists():
            args += ["--method", "elder", "--preset", "fast"]
            args += [a for k, v in {**ELDER, **(settings or {})}.items() for a in ("--set", f"{k}={v}")]
        environment = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        if token:
            environment["ELDER_TOKEN"] = token
        self.process, url = spawn(args, environment)
        self.port = int(url.rsplit(":", 1)[1])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, timeout=120, headers=headers)

    def wait_applied(self, seq: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while self.http.get("/health").json()["applied_seq"] < seq:
            assert time.time() < deadline, "edits not applied in time"
            time.sleep(0.2)

    def ask(self, *prompts: str) -> list[dict]:
        response = self.http.post("/ask", json={"prompts": list(prompts), "max_new_tokens": 5})
        assert response.status_code == 200, response.text
        return response.json()["answers"]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.http.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.http.close()


@pytest.fixture
def server(tmp_path, model):
    started = Server(tmp_path / "memory", model)
    yield started
    started.stop()


def test_edits_are_acknowledged_applied_in_order_and_answered(server):
    base = server.ask(EDITS[0]["prompt"], UNRELATED)
    accepted = server.http.post("/edits", json={"edits": EDITS})
    assert accepted.status_code == 202
    body = accepted.json()["edits"]
    assert [e["id"] for e in body] == ["zq", "mw"] and [e["queue_position"] for e in body] == [1, 2]
    server.wait_applied(body[-1]["seq"])
    assert server.http.get("/edits/zq").json()["status"] == "applied"
    edited, unrelated = server.ask(EDITS[0]["prompt"], UNRELATED)
    assert edited["answer"].startswith(" Quem") and edited["used_memory"] and edited["edit_id"] == "zq"
    assert unrelated["answer"] == base[1]["answer"] and not unrelated["used_memory"]
    assert base[0]["answer"] != edited["answer"]
    assert [e["id"] for e in server.http.get("/edits").json()["held"]] == ["zq", "mw"]
    metrics = server.http.get("/metrics").text
    assert "elder_edits_applied_total 2.0" in metrics and "elder_queue_length 0.0" in metrics


def test_a_replaced_edit_answers_its_new_target_and_a_forgotten_one_the_base_model(server):
    base = server.ask(EDITS[1]["prompt"])[0]
    server.wait_applied(server.http.post("/edits", json=EDITS[1]).json()["edits"][0]["seq"])
    replaced = server.http.put("/edits/mw", json={**EDITS[1], "target": " zib"})
    assert replaced.status_code == 202
    server.wait_applied(replaced.json()["seq"])
    assert server.ask(EDITS[1]["prompt"])[0]["answer"].startswith(" zib")
    forgotten = server.http.delete("/edits/mw")
    server.wait_applied(forgotten.json()["seq"])
    assert server.http.get("/edits/mw").json()["status"] == "forgotten"
    after = server.ask(EDITS[1]["prompt"])[0]
    assert after["answer"] == base["answer"] and not after["used_memory"]


def test_bad_requests_get_a_4xx_and_change_nothing(server, tmp_path, model):
    http = server.http
    assert http.post("/edits", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert http.post("/edits", json={"prompt": "The colour of Mirtavej is", "target": "  "}).status_code == 422
    assert http.post("/edits", json={"prompt": "x" * 5000, "target": " y"}).status_code == 413
    assert http.post("/edits", json={"prompt": "word " * 600, "target": " y"}).status_code == 422  # past the context
    assert http.post("/edits", json={"edits": [EDITS[0]] * 65}).status_code == 413
    assert http.post("/ask", json={"prompts": [UNRELATED], "max_new_tokens": 10_000}).status_code == 422
    huge = http.post("/edits", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    unknown = (http.get("/edits/nope"), http.put("/edits/nope", json={"prompt": "p", "target": " t"}),
               http.delete("/edits/nope"))
    for request in unknown:
        assert request.status_code == 404
    assert http.post("/edits", json={"edits": [EDITS[0], EDITS[0]]}).status_code == 409  # repeated in one request
    assert http.get("/health").json()["queued"] == 0 and http.get("/edits").json() == {"held": [], "queued": []}


def test_a_full_queue_refuses_a_request_whole(tmp_path, model):
    server = Server(tmp_path / "memory", model, options=("--max-queue", "2"))
    try:
        refused = server.http.post("/edits", json={"edits": [{**e, "id": f"q{i}-{e['id']}"} for i in range(2)
                                                             for e in EDITS[:2]][:3]})
        assert refused.status_code == 429 and "at most 2" in refused.json()["detail"]
        assert server.http.get("/edits").json() == {"held": [], "queued": []}
        assert server.http.post("/edits", json={"edits": EDITS}).status_code == 202
    finally:
        server.stop()


def test_an_edit_the_method_refuses_fails_alone_and_leaves_nothing(server):
    too_long = {"id": "long", "prompt": "The colour of Habrosk is", "target": " " + "x" * 40}  # > max_target_tokens
    accepted = server.http.post("/edits", json={"edits": [too_long, EDITS[0], EDITS[1]]}).json()["edits"]
    server.wait_applied(accepted[-1]["seq"])
    statuses = {e["id"]: server.http.get(f"/edits/{e['id']}").json() for e in accepted}
    assert [statuses[i]["status"] for i in ("zq", "long", "mw")] == ["applied", "failed", "applied"]
    assert "max_target_tokens" in statuses["long"]["error"]
    assert [e["id"] for e in server.http.get("/edits").json()["held"]] == ["zq", "mw"]
    assert "elder_edits_failed_total 1.0" in server.http.get("/metrics").text
    assert server.ask(EDITS[0]["prompt"])[0]["answer"].startswith(" Quem")


def test_a_token_guards_every_change(tmp_path, model):
    server = Server(tmp_path / "memory", model, token="s3cret")
    try:
        anonymous = httpx.Client(base_url=f"http://127.0.0.1:{server.port}")
        wrong = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers={"Authorization": "Bearer nope"})
        for client in (anonymous, wrong):
            assert client.post("/edits", json=EDITS[0]).status_code == 401
            assert client.delete("/edits/zq").status_code == 401
        assert anonymous.post("/ask", json={"prompts": [UNRELATED]}).status_code == 200  # reading needs none
        assert server.http.post("/edits", json=EDITS[0]).status_code == 202
    finally:
        server.stop()
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--memory", str(tmp_path / "m2")],
                                env={"ELDER_TOKEN": ""})
    assert result.exit_code == 2 and "without a bearer token" in result.output


@pytest.mark.parametrize("moment", ["edit", "checkpoint"])
def test_sigkill_loses_no_acknowledged_edit_and_applies_each_once(tmp_path, model, moment):
    edits = [{"id": f"e{i}", "prompt": f"The colour of Mirtav{chr(97 + i)}j is", "target": f" w{chr(97 + i)}x"}
             for i in range(10)]
    env = {"ELDER_SERVE_CHECKPOINT_DELAY": "5"} if moment == "checkpoint" else {}
    # every batch trains all its 200 steps, so that the kill finds one training
    server = Server(tmp_path / "memory", model, env=env, settings={"early_stop": "false"})
    seqs = [e["seq"] for e in server.http.post("/edits", json={"edits": edits}).json()["edits"]]
    if moment == "checkpoint":  # killed while the first checkpoint is written but not yet published
        deadline = time.time() + 120
        while not any((tmp_path / "memory" / "checkpoints").glob("0*")):
            assert time.time() < deadline
            time.sleep(0.05)
    else:  # killed while a batch trains, with edits still queued
        time.sleep(0.3)
        assert server.http.get("/health").json()["applied_seq"] < seqs[-1]
    server.kill()
    assert server.process.returncode == -signal.SIGKILL
    restarted = Server(tmp_path / "memory", model)
    try:
        restarted.wait_applied(seqs[-1])
        held = [e["id"] for e in restarted.http.get("/edits").json()["held"]]
        assert held == [e["id"] for e in edits]
        assert all(restarted.http.get(f"/edits/{e['id']}").json()["status"] == "applied" for e in edits)
        assert "elder_edits_failed_total 0.0" in restarted.http.get("/metrics").text
        answers = restarted.ask(*[e["prompt"] for e in edits])
        again = restarted.ask(*[e["prompt"] for e in edits])
    finally:
        restarted.stop()
    assert answers == again and all(a["used_memory"] for a in answers)
    assert json.loads((tmp_path / "memory" / "checkpoint.json").read_text())["seq"] == seqs[-1]


def test_questions_are_answered_while_edits_stream_in(server):
    failures, answered = [], []

    def ask_many() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as client:
            for _ in range(6):
                response = client.post("/ask", json={"prompts": [UNRELATED, EDITS[0]["prompt"]], "max_new_tokens": 3})
                (answered if response.status_code == 200 else failures).append(response)

    threads = [threading.Thread(target=ask_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    seqs = [server.http.post("/edits", json={**e, "id": f"s{i}-{e['id']}"}).json()["edits"][0]["seq"]
            for i in range(2) for e in EDITS]
    for thread in threads:
        thread.join()
    assert not failures and len(answered) == 24
    server.wait_applied(seqs[-1])


def test_openai_clients_query_the_edited_model_unchanged(server):
    openai = pytest.importorskip("openai")
    server.wait_applied(server.http.post("/edits", json=EDITS[0]).json()["edits"][0]["seq"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
    completion = client.completions.create(model="tiny", prompt=EDITS[0]["prompt"], max_tokens=5)
    assert completion.choices[0].text.startswith(" Quem")
    chat = client.chat.completions.create(model="tiny", max_tokens=5,
                                          messages=[{"role": "user", "content": EDITS[0]["prompt"]}])
    streamed = client.chat.completions.create(model="tiny", max_tokens=5, stream=True,
                                              messages=[{"role": "user", "content": EDITS[0]["prompt"]}])
    pieces = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert chat.choices[0].message.content == completion.choices[0].text == pieces
    text_stream = client.completions.create(model="tiny", prompt=EDITS[0]["prompt"], max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in text_stream) == completion.choices[0].text
    schema = server.http.get("/openapi.json").json()
    assert {"/edits", "/edits/{edit_id}", "/ask", "/health", "/metrics", "/v1/completions",
            "/v1/chat/completions"} <= set(schema["paths"])
