"""Admission on the routes, no Ray (the real Ingress handlers over a real SQLite store, as in
tests/test_error_contract.py): a resume is admitted like a submission, so cancelling and
resuming cannot run more generations at once than the per-user limit."""

from __future__ import annotations

from tests.test_error_contract import BODY, auth, make_env  # noqa: F401  (make_env is a fixture)


def submit(env) -> str:
    reply = env.client.post("/api/generate", json=BODY, headers=auth())
    assert reply.status_code == 202, reply.text
    return reply.json()["generation_id"]


def test_a_resume_past_the_active_limit_is_refused_with_retry_after(make_env):
    env = make_env()  # max_active_per_user: 1
    first = submit(env)
    assert env.client.delete(f"/api/generations/{first}", headers=auth()).json()["status"] == "cancelled"
    second = submit(env)  # the one active generation allowed
    refused = env.client.post(f"/api/generations/{first}/resume", headers=auth())
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1 and "limit 1" in refused.json()["detail"]
    assert env.store.get(first).status == "cancelled" and env.store.count_active("alice") == 1
    # Once the active one is cancelled, the resume is admitted.
    assert env.client.delete(f"/api/generations/{second}", headers=auth()).status_code == 202
    resumed = env.client.post(f"/api/generations/{first}/resume", headers=auth())
    assert resumed.status_code == 202, resumed.text
    assert env.store.get(first).status == "queued"


def test_a_resume_is_not_a_submission_for_the_window(make_env):
    """The window bounds submissions; resuming one already counted does not count again."""
    env = make_env()
    env.args.limits.max_active_per_user, env.args.limits.max_submitted_per_window = 5, 2
    first = submit(env)
    submit(env)
    assert env.client.post("/api/generate", json=BODY, headers=auth()).status_code == 429  # the window is full
    env.client.delete(f"/api/generations/{first}", headers=auth())
    assert env.client.post(f"/api/generations/{first}/resume", headers=auth()).status_code == 202
