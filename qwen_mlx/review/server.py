"""``qwen-mlx review``'s server: the review page or the grading page, and the calls behind it.

It keeps ``serve``'s conventions (:mod:`qwen_mlx.serve.guard`, :mod:`qwen_mlx.serve.page`):
the Host check against DNS rebinding, the API key (the page and its assets load without it,
then ask for it), a body limit, CORS only for the origins named, and a page that loads
nothing from elsewhere, cannot be framed, and puts every text from the data or a model on
the page as text, never as markup.

Calls (JSON): ``GET /api/info``; for a data review ``GET /api/records`` and ``POST
/api/decide``; for an eval report ``GET /api/answers`` and ``POST /api/grade``; and ``GET
/api/changes?since=SEQ``, which the page polls to show what other people decided. A
decision answers only once it is on disk; one made on a record that changed since the page
loaded it answers 409 with the other decision, for the person to choose.
"""

from __future__ import annotations

import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from qwen_mlx.review.grades import Grading
from qwen_mlx.review.ledger import Conflict
from qwen_mlx.review.reviewed import Review
from qwen_mlx.serve.api import ErrorResponse, install_error_handlers
from qwen_mlx.serve.guard import Guard, allow_origins, allowed_hosts, http_protocol
from qwen_mlx.serve.page import PAGE_HEADERS

PAGES = {"review": "review.html", "grade": "grade.html"}
ASSETS = {
    "common.js": "text/javascript",
    "review.js": "text/javascript",
    "grade.js": "text/javascript",
    "style.css": "text/css",
}
PUBLIC_PATHS = frozenset({"/", *(f"/ui/{name}" for name in ASSETS)})
MAX_BODY = 1 << 20  # an edit is at most three fields of 20,000 characters
MAX_NAME = 64
SHOWN_PROBLEMS = 50


class ReviewServer:
    """What one ``qwen-mlx review`` serves: a data review or an eval report's grading."""

    def __init__(
        self,
        work: Review | Grading,
        reviewer: str | None = None,
        api_key: str | None = None,
        cors_origins: tuple[str, ...] = (),
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.work = work
        self.mode = "review" if isinstance(work, Review) else "grade"
        self.reviewer = check_name(reviewer) if reviewer is not None else None
        self.api_key, self.cors_origins = api_key, list(cors_origins)
        self.allowed_hosts = allowed_hosts

    def who(self, given: str | None) -> str:
        """The name a decision is recorded under: ``--reviewer``, else the page's."""
        if self.reviewer is not None:
            return self.reviewer
        if given is None:
            raise ValueError("reviewer: give your name (the page asks for it once)")
        return check_name(given)


def check_name(name: str) -> str:
    """A reviewer's name: 1–64 characters, no control characters. ValueError otherwise."""
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"reviewer: a name of 1 to {MAX_NAME} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ValueError("reviewer: no control characters in a name")
    return name


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    action: str
    base_version: int
    fields: dict[str, Any] | None = None
    reviewer: str | None = None


class GradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    grade: str
    base_version: int
    corrected: str | None = None
    reviewer: str | None = None


def _asset(name: str) -> bytes:
    return resources.files("qwen_mlx.review").joinpath("web", name).read_bytes()


def _conflict(current: dict) -> JSONResponse:
    who = current.get("reviewer") or "someone"
    message = f"{who} changed this at {current.get('time')} since you loaded it"
    error = {"message": message, "type": "conflict", "param": "base_version", "code": "conflict"}
    return JSONResponse({"error": error, "current": current}, status_code=409)


def _decided(call, *args) -> Any:
    """Run a decision: its new state, or the error the page shows."""
    try:
        return call(*args)
    except KeyError:
        return ErrorResponse(404, "no such record or answer (the data changed?)", "id")
    except ValueError as err:
        return ErrorResponse(400, str(err))


def add_review_routes(app: FastAPI, server: ReviewServer, review: Review) -> None:
    @app.get("/api/info")
    def info():
        data = review.data
        return {
            "mode": "review",
            "title": str(data.root),
            "reviewer": server.reviewer,
            "files": [f.name for f in data.files],
            "outputs": str(review.out_dir),
            "drops": data.drops,
            "problems": data.problems[:SHOWN_PROBLEMS],
            "problem_count": len(data.problems),
            "counts": review.counts(),
        }

    @app.get("/api/records")
    def records():
        with review.lock:
            rows = [{**item.as_json(), **review.state(item.id)} for item in review.data.items]
            return {"records": rows, "passages": review.data.passages, "seq": review.ledger.seq}

    @app.get("/api/changes")
    def changes(since: int = 0):
        with review.lock:
            states = review.changed_since(since)
            return {"seq": review.ledger.seq, "states": states, "counts": review.counts()}

    @app.post("/api/decide")
    def decide(body: Decision):
        def run():
            who = server.who(body.reviewer)
            try:
                state = review.decide(body.id, body.action, body.base_version, who, body.fields)
            except Conflict:
                return _conflict(review.state(body.id))
            return {"state": state, "counts": review.counts(), "seq": review.ledger.seq}

        return _decided(run)


def add_grade_routes(app: FastAPI, server: ReviewServer, grading: Grading) -> None:
    @app.get("/api/info")
    def info():
        return {
            "mode": "grade",
            "title": str(grading.dir),
            "reviewer": server.reviewer,
            "labels": grading.labels,
            "stats": grading.stats(),
        }

    @app.get("/api/answers")
    def answers():
        with grading.lock:
            rows = [grading.row_json(i) for i in range(len(grading.rows))]
            states = [grading.state(key) for key in grading.answers]
            return {"rows": rows, "states": states, "seq": grading.ledger.seq,
                    "stats": grading.stats()}  # fmt: skip

    @app.get("/api/changes")
    def changes(since: int = 0):
        with grading.lock:
            return {"seq": grading.ledger.seq, "states": grading.states(since),
                    "stats": grading.stats()}  # fmt: skip

    @app.post("/api/grade")
    def grade(body: GradeRequest):
        def run():
            who = server.who(body.reviewer)
            try:
                state = grading.grade(body.id, body.grade, body.corrected, body.base_version, who)
            except Conflict:
                return _conflict(grading.state(body.id))
            return {"state": state, "stats": grading.stats(), "seq": grading.ledger.seq}

        return _decided(run)


def create_app(server: ReviewServer, bound: str = "127.0.0.1") -> FastAPI:
    """The app of ``server``, listening on the address ``bound`` (which it answers to)."""
    app = FastAPI(title="qwen-mlx review", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(
        Guard,
        api_key=server.api_key,
        max_body=MAX_BODY,
        hosts=allowed_hosts(bound, server.allowed_hosts),
        public=PUBLIC_PATHS,
    )
    allow_origins(app, server.cors_origins)
    page = PAGES[server.mode]

    @app.get("/", include_in_schema=False)
    def index():
        headers = {**PAGE_HEADERS, "Cache-Control": "no-cache"}
        return Response(_asset(page), media_type="text/html", headers=headers)

    for name, media_type in ASSETS.items():
        app.add_api_route(f"/ui/{name}", _asset_route(name, media_type), include_in_schema=False)
    if isinstance(server.work, Review):
        add_review_routes(app, server, server.work)
    else:
        add_grade_routes(app, server, server.work)
    return app


def _asset_route(name: str, media_type: str):
    def asset():
        return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "no-cache"})

    return asset


def make_server(server: ReviewServer, host: str, port: int, log_level: str = "warning"):
    config = uvicorn.Config(
        create_app(server, bound=host),
        host=host,
        port=port,
        log_level=log_level,
        http=http_protocol(),
    )
    return uvicorn.Server(config)


def open_work(target: Path, only_reviewed: bool = False) -> Review | Grading:
    """A run or an eval folder (``answers.jsonl``): its grading; else a data review."""
    from qwen_mlx.review.grades import eval_dir

    folder = eval_dir(target)
    if folder is not None:
        return Grading(folder)
    return Review(target, only_reviewed)


def run(target: Path, host: str, port: int, console, **options: Any) -> None:
    """Serve the review of ``target`` until Ctrl-C or SIGTERM. ``options``: ``only_reviewed``
    and the :class:`ReviewServer`'s."""
    work = open_work(target, options.pop("only_reviewed", False))
    server = ReviewServer(work, **options)
    where = f"http://{host}:{port}/"
    if isinstance(work, Review):
        counts = work.counts()
        what = f"{counts['reviewed']} / {counts['total']} records reviewed"
        saved = f"decisions: {work.ledger.path}; reviewed set: {work.out_dir}"
    else:
        what = f"{len(work.rows)} questions of the eval report {work.dir}"
        saved = f"grades: {work.ledger.path}"
    console.print(f"review page: {where} ({what}; Ctrl-C stops)", highlight=False)
    console.print(f"  {saved}", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1") and not server.api_key:
        console.print("[yellow]⚠[/] listening beyond this machine without --api-key")
    make_server(server, host, port).run()
