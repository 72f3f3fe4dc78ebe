// The job page, live. The job's event stream (EventSource, the page's watch token in its
// URL) moves the progress bar and shows each preview as it is announced; the page's state
// (prompt, enhanced prompt, status, result or error) is read again at every stage edge and
// at the end.
"use strict";

const page = document.getElementById("job");
const jobId = page.dataset.jobId;
const token = page.dataset.token;
const byId = (id) => document.getElementById(id);

function withToken(path) {
  const url = new URL(path, window.location.origin);
  if (token) url.searchParams.set("token", token);
  return url.pathname + url.search;
}

function known(value) {
  return value !== null && value !== undefined;
}

function showProgress(progress) {
  if (known(progress.percent)) {
    byId("bar").value = progress.percent;
    byId("percent").textContent = `${progress.percent.toFixed(1)} %`;
  }
  byId("eta").textContent = known(progress.eta_seconds)
    ? `ETA ${Math.round(progress.eta_seconds)} s`
    : "";
  if (progress.event === "step") {
    const window = progress.windows > 1 ? `, window ${progress.window}/${progress.windows}` : "";
    byId("stage").textContent = `${progress.stage}: step ${progress.step}/${progress.total_steps}${window}`;
  } else if (progress.stage !== undefined) {
    byId("stage").textContent = progress.stage || "";
  }
}

function showState(state) {
  byId("job-type").textContent = state.job_type || "job";
  byId("prompt").textContent = state.prompt || "";
  byId("enhanced-prompt").textContent = state.enhanced_prompt || "";
  byId("enhanced").hidden = !state.enhanced_prompt;
  byId("status").textContent = state.status || "waiting";
  byId("error").textContent = state.error || "";
  byId("error").hidden = !state.error;
  showProgress(state);
  if (state.result_url && byId("result").hidden) {
    const media = byId(state.content_type === "image" ? "result-image" : "result-video");
    media.src = withToken(state.result_url);
    media.hidden = false;
    byId("thumbnail").src = withToken(state.thumbnail_url);
    byId("result").hidden = false;
    byId("live").hidden = true;
  }
}

async function refresh() {
  const answer = await fetch(withToken(`/ui/jobs/${jobId}/state`));
  if (answer.ok) showState(await answer.json());
}

function showPreview(preview) {
  byId("preview").src = withToken(preview.url);
  const window = known(preview.window) ? `, window ${preview.window}` : "";
  byId("preview-step").textContent = `preview of step ${preview.step}/${preview.total_steps}${window}`;
  if (byId("result").hidden) byId("live").hidden = false;
}

showState(JSON.parse(byId("initial-state").textContent));
const events = new EventSource(withToken(`/jobs/${jobId}/events`));
const on = (kind, show) => events.addEventListener(kind, (e) => show(JSON.parse(e.data)));
on("snapshot", (snapshot) => {
  byId("status").textContent = snapshot.status || "waiting";
  if (snapshot.progress) showProgress(snapshot.progress);
});
on("step", showProgress);
on("stage_restarted", showProgress);
on("stage_started", (event) => { showProgress(event); refresh(); });
on("stage_finished", (event) => { showProgress(event); refresh(); });
on("preview", showPreview);
on("final", (event) => {
  events.close();
  showProgress(event);
  refresh();
});
events.onerror = () => {
  if (events.readyState === EventSource.CLOSED) {
    byId("stage").textContent = "the event stream was refused: no such job, or the token expired";
  }
};
