"""The Studio end to end in a real browser: Playwright drives Debian's chromium against a real
`studio serve` with its embedded session service (one warm Spark session) and real JupyterLab.

A user opens the Studio, is asked for the token and signs in with it, gets a clear error for a bad name, creates a workspace, starts it,
opens its JupyterLab, sees the getting-started notebook, creates a PySpark notebook, runs
`spark.range(5).count()` and sees 5, finds the session under the compute, is told that a running
workspace is not deleted, stops the workspace, runs the saved notebook as an execution and finds
its outputs, and deletes the workspace keeping its files. Every step leaves a screenshot in test-artifacts/studio-browser/.

Then a web page on another origin (another port of 127.0.0.1, so same-site for cookies) tries
what a drive-by page would against the signed-in Studio and its session service: JSON-looking
text/plain fetches, a text/plain form and a read of the workspace list. Nothing is created and
nothing is read.
"""

from __future__ import annotations

import http.server
import re
import threading

import httpx
import nbformat
import pytest

from browser_helpers import artifacts, needs_chromium, shots_on_failure
from workspace_helpers import serving, wait_gone

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def studio(test_root):
    with serving(test_root / "browser", env={"STUDIO_POOL_WARMUP_SECONDS": "3"}, pool=1) as server:
        yield server


@pytest.fixture(scope="module")
def shots():
    return artifacts("studio-browser")


def test_a_user_runs_spark_in_a_new_workspace(studio, context, shots):
    with shots_on_failure(context, shots):
        user_story(studio, context, shots)


def user_story(studio, context, shots) -> None:
    expect = playwright_api.expect
    # Assertions wait up to 20 s, not Playwright's 5 s: a CI machine with two cores also runs a
    # Spark driver, a JupyterLab and the Studio while the browser redraws.
    expect.set_options(timeout=20_000)
    page = context.new_page()
    # Nothing without signing in: the Studio sends the browser to its login page, and a wrong token is refused.
    page.goto(studio.url)
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    page.get_by_label("Token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".error")).to_contain_text("not valid")
    page.screenshot(path=shots / "00-sign-in-refused.png")
    page.get_by_label("Token").fill(studio.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Workspaces")).to_be_visible()
    expect(page.locator(".signout .who")).to_have_text("admin")
    expect(page.locator("#workspace-rows")).to_contain_text("No workspaces yet")
    expect(page.locator("#compute-local")).to_contain_text("Healthy")
    page.screenshot(path=shots / "01-studio.png", full_page=True)

    # A name with a slash is refused with the API's message, right under the form.
    page.get_by_role("button", name="New workspace").click()
    form = page.locator("#create-form")
    form.get_by_label("Name").fill("../etc")
    form.get_by_role("button", name="Create workspace").click()
    expect(form.locator(".form-error")).to_contain_text("contains a slash")
    page.screenshot(path=shots / "02-create-error.png", full_page=True)

    form.get_by_label("Name").fill("demo")
    form.get_by_label("Description").fill("Spark in the browser")
    expect(form.get_by_label("Compute")).to_have_value("local")
    form.get_by_role("button", name="Create workspace").click()
    expect(page.locator("#flash")).to_contain_text("Workspace demo created and starting")
    row = page.locator("tr.ws-row", has_text="demo")
    expect(row.locator("[data-role=state]")).to_have_text(re.compile("Starting|Attaching|Attached"))
    expect(row.locator("[data-role=state]")).to_have_text("Attached", timeout=120_000)
    page.screenshot(path=shots / "03-workspace-attached.png", full_page=True)

    # JupyterLab opens in a new tab, logged in by the token in the link.
    with context.expect_page() as opened:
        row.get_by_role("link", name="Open JupyterLab").click()
    lab = opened.value
    lab.set_viewport_size({"width": 1366, "height": 860})
    notebook_entry = lab.locator(".jp-DirListing-item", has_text="getting-started.ipynb")
    expect(notebook_entry).to_be_visible(timeout=120_000)
    launcher_card = lab.locator('.jp-LauncherCard[data-category="Notebook"]', has_text="PySpark")
    expect(launcher_card).to_be_visible()
    lab.screenshot(path=shots / "04-jupyterlab-launcher.png")

    notebook_entry.dblclick()
    expect(lab.locator(".jp-Notebook").first).to_contain_text("Getting started with Spark Studio")
    expect(lab.locator(".jp-Toolbar-kernelName").first).to_contain_text("PySpark")
    lab.screenshot(path=shots / "05-getting-started.png")

    # A new notebook with the PySpark kernel, one cell, run.
    lab.get_by_role("button", name=re.compile("^New Launcher")).first.click()
    lab.locator('.jp-LauncherCard[data-category="Notebook"]:visible', has_text="PySpark").click()
    panel = lab.locator(".jp-NotebookPanel:visible")
    expect(panel.locator(".jp-Toolbar-kernelName")).to_contain_text("PySpark")
    studio.wait_warm_pool()
    panel.locator(".jp-Cell .cm-content").first.click()
    lab.keyboard.type("spark.range(5).count()")
    lab.keyboard.press("Shift+Enter")
    # The kernel prints the result as Livy's text/plain, after the session's table and the progress line.
    # (the result is the statement's stdout, as in sparkmagic, so it may share a stream output with the line above)
    result = panel.locator(".jp-OutputArea-output", has_text=re.compile(r"(^|\n)\s*5\s*$"))
    expect(result).to_have_count(1, timeout=180_000)
    expect(panel.locator(".jp-OutputArea-output").first).to_contain_text("Starting Spark application")
    lab.screenshot(path=shots / "06-spark-range-count.png")
    # Saved under a name (JupyterLab asks on a first save), so it can run headless below.
    lab.keyboard.press("Control+s")
    rename = lab.locator(".jp-Dialog")
    rename.get_by_role("textbox", name="File name").fill("count.ipynb")
    rename.get_by_role("button", name="Rename and Save").click()
    expect(lab.get_by_role("tab", name="count.ipynb")).to_be_visible()
    # The file browser shows the new name on its next refresh, which can take a few seconds.
    expect(lab.locator(".jp-DirListing-item", has_text="count.ipynb")).to_be_visible(timeout=30_000)

    # The Studio shows the notebook's Spark session under the compute, with its Spark UI and log.
    page.bring_to_front()
    session_row = page.locator("#compute-local table.sessions tbody tr").first
    expect(session_row).to_contain_text("idle", timeout=30_000)
    expect(session_row.get_by_role("link", name="Spark UI")).to_have_attribute("href", re.compile(r"^http://"))
    expect(session_row.get_by_role("link", name="Log")).to_have_attribute("href", re.compile(r"/ui/session/\d+/log$"))
    page.locator("#computes").scroll_into_view_if_needed()
    page.screenshot(path=shots / "07-compute-sessions.png", full_page=True)

    # Deleting a running workspace is refused unless "stop it first" is ticked; the dialog says why.
    row.get_by_role("button", name="Delete").click()
    dialog = page.locator("#delete-dialog")
    expect(dialog).to_contain_text("a running workspace is not deleted unless it is stopped first")
    dialog.get_by_role("button", name="Delete").click()
    expect(dialog.locator(".form-error")).to_contain_text("Workspace 'demo' is Attached; stop it first")
    page.screenshot(path=shots / "08-delete-running-refused.png")
    dialog.get_by_role("button", name="Cancel").click()
    expect(row.locator("[data-role=state]")).to_have_text("Attached")

    # Stop: JupyterLab and its kernels end, and the kernels end their Spark sessions.
    with studio.client() as api:
        running = api.workspaces()[0]
    assert row.get_by_role("link", name="Open JupyterLab").get_attribute("href") == running["url"]
    lab_url, lab_pid = running["lab_url"], running["jupyterlab"]["pid"]
    row.get_by_role("button", name="Stop").click()
    expect(row.locator("[data-role=state]")).to_have_text("Idle", timeout=90_000)
    expect(row.locator("[data-role=reason]")).to_have_text("Stopped on request.")
    expect(row.get_by_role("link", name="Open JupyterLab")).to_have_count(0)
    assert wait_gone(lab_pid)
    with pytest.raises(httpx.HTTPError):
        httpx.get(lab_url, timeout=5)
    # The kernel deleted its session, which (as in Livy) leaves the list at once.
    sessions = studio.get("/api/computes/local").json()["sessions"]
    assert all(s["state"] not in ("idle", "busy", "starting") for s in sessions), sessions
    page.screenshot(path=shots / "09-workspace-stopped.png", full_page=True)

    # The saved notebook runs headless as an execution (no JupyterLab needed), listed with its outputs.
    saved = [studio.root / "demo" / "count.ipynb"]
    assert saved[0].is_file(), "the new notebook was saved in the workspace"
    page.get_by_role("button", name="Run notebook").click()
    run_form = page.locator("#execution-form")
    expect(run_form.locator("select[name=workspace]")).to_have_value("demo")
    run_form.locator("input[name=notebook]").fill("missing.ipynb")
    run_form.get_by_role("button", name="Run").click()
    expect(run_form.locator(".form-error")).to_contain_text("Notebook 'missing.ipynb' not found")
    run_form.locator("input[name=notebook]").fill(saved[0].name)
    run_form.get_by_role("button", name="Run").click()
    expect(page.locator("#flash")).to_contain_text(f"of {saved[0].name} queued on local")
    execution_row = page.locator("tr.ex-row").first
    expect(execution_row.locator("[data-role=status]")).to_have_text("FINISHED", timeout=240_000)
    expect(execution_row).to_contain_text("1 cell succeeded")
    expect(execution_row.get_by_role("link", name=".ipynb")).to_have_attribute("href", re.compile(r"/output\.ipynb$"))
    ipynb = studio.get(execution_row.get_by_role("link", name=".ipynb").get_attribute("href"))
    ran = nbformat.reads(ipynb.text, as_version=4).cells[0]
    assert ran.source == "spark.range(5).count()"
    assert re.search(r"(^|\n)5\n?$", "".join(o.get("text", "") for o in ran.outputs if o.output_type == "stream")), ran.outputs
    html = studio.get(execution_row.get_by_role("link", name="HTML").get_attribute("href"))
    assert html.status_code == 200 and "range" in html.text and "SparkSession available" in html.text
    page.locator("#executions").scroll_into_view_if_needed()
    page.screenshot(path=shots / "10-execution-finished.png", full_page=True)

    # Delete keeps the files unless asked, and the dialog says so.
    row.get_by_role("button", name="Delete").click()
    expect(dialog).to_contain_text("Its notebook files are kept in")
    expect(dialog.locator(".running-note")).to_be_hidden()
    page.screenshot(path=shots / "11-delete-dialog.png")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator("#workspace-rows")).to_contain_text("No workspaces yet")
    expect(page.locator("#flash")).to_contain_text("its files are kept in")
    assert (studio.root / "demo" / "getting-started.ipynb").exists()
    assert (studio.root / "demo" / "count.ipynb").exists()
    page.screenshot(path=shots / "12-deleted-files-kept.png", full_page=True)


ATTACK_PAGE = """<!doctype html><html><body>
<iframe name="sink-studio"></iframe><iframe name="sink-livy"></iframe>
<form id="form-studio" method="post" enctype="text/plain" target="sink-studio" action="{studio}/api/workspaces">
  <input name='{{"name": "pwned-form", "x": "' value='"}}'></form>
<form id="form-livy" method="post" enctype="text/plain" target="sink-livy" action="{livy}/sessions">
  <input name='{{"kind": "pyspark", "name": "pwned-form", "x": "' value='"}}'></form>
<script>
const results = {{}};
async function attempt(name, url, options) {{
  try {{
    const response = await fetch(url, options);
    results[name] = response.type === "opaque" ? "opaque" : response.status + " " + (await response.text());
  }} catch (error) {{ results[name] = "error: " + error; }}
}}
(async () => {{
  const simple = {{ method: "POST", mode: "no-cors", credentials: "include", headers: {{ "Content-Type": "text/plain" }} }};
  await attempt("studio-create", "{studio}/api/workspaces", {{ ...simple, body: JSON.stringify({{ name: "pwned" }}) }});
  await attempt("livy-create", "{livy}/sessions", {{ ...simple, body: JSON.stringify({{ kind: "pyspark", name: "pwned" }}) }});
  await attempt("studio-read", "{studio}/api/workspaces", {{ credentials: "include" }});
  await attempt("livy-read", "{livy}/sessions", {{ credentials: "include" }});
  await attempt("studio-json", "{studio}/api/workspaces", {{ method: "POST", credentials: "include",
    headers: {{ "Content-Type": "application/json" }}, body: JSON.stringify({{ name: "pwned-json" }}) }});
  document.getElementById("form-studio").submit();
  document.getElementById("form-livy").submit();
  await new Promise((done) => setTimeout(done, 3000));
  document.title = "done";
  document.body.dataset.results = JSON.stringify(results);
}})();
</script></body></html>"""


def test_a_page_on_another_origin_cannot_use_the_signed_in_studio(studio, context, shots):
    """Signed in to both servers (cookies), the browser visits a page on another port of 127.0.0.1."""
    expect = playwright_api.expect
    livy_url = studio.get("/api/computes/local").json()["url"]
    page = context.new_page()
    page.goto(f"{studio.url}/?token={studio.token}")  # the ready-to-click URL signs the browser in
    expect(page.get_by_role("heading", name="Workspaces")).to_be_visible()
    assert "token=" not in page.url
    page.goto(f"{livy_url}/ui/session/0/log?token={studio.token}")  # and the session service too
    assert any(cookie["name"].startswith("spark-studio-") for cookie in context.cookies())

    html = ATTACK_PAGE.format(studio=studio.url, livy=livy_url).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        attack = context.new_page()
        attack.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        expect(attack).to_have_title("done", timeout=30_000)
        results = attack.evaluate("JSON.parse(document.body.dataset.results)")
        attack.screenshot(path=shots / "13-cross-origin-page.png")
    finally:
        server.shutdown()
        server.server_close()
    # Reads fail (no CORS), and nothing the page sent was acted on.
    assert results["studio-read"].startswith("error") and results["livy-read"].startswith("error"), results
    assert results["studio-json"].startswith("error"), results  # a JSON POST needs a preflight, which is refused
    with studio.client() as api:
        assert not [w for w in api.workspaces() if w["name"].startswith("pwned")]
    sessions = httpx.get(f"{livy_url}/sessions", headers={"Authorization": f"Bearer {studio.token}"}, timeout=30).json()
    assert not [s for s in sessions["sessions"] if (s.get("name") or "").startswith("pwned")], sessions
    # The Studio still works for its own page.
    page.goto(studio.url)
    expect(page.get_by_role("heading", name="Workspaces")).to_be_visible()
