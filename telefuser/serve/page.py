"""The page at `/`: a form generated from the plan's Layer 3 (a field per parameter, with its default, choices and
range), a progress bar fed by `GET /v1/videos/{id}`, and the video shown when done. Plain HTML and a little
JavaScript, no external assets; every value the plan supplies is HTML-escaped."""

from __future__ import annotations

import html

from telefuser.schema.plan import Plan

from .params import IMAGE_FIELD, plan_name, plan_seconds

_SCRIPT = r"""
const $ = (id) => document.getElementById(id);
const keyField = $("api-key");
if (keyField) { keyField.value = sessionStorage.getItem("telefuser-key") || ""; }
function auth() {
  const key = keyField ? keyField.value.trim() : "";
  if (keyField) sessionStorage.setItem("telefuser-key", key);
  return key ? {"Authorization": "Bearer " + key} : {};
}
function show(status, text) { $("status").textContent = status; $("message").textContent = text || ""; }
async function poll(id) {
  while (true) {
    const r = await fetch("/v1/videos/" + encodeURIComponent(id), {headers: auth()});
    const job = await r.json();
    if (!r.ok) { show("failed", job.error ? job.error.message : r.statusText); return; }
    $("progress").value = job.progress;
    show(job.status, job.error ? job.error.message : "");
    if (job.status === "completed") {
      const c = await fetch("/v1/videos/" + encodeURIComponent(id) + "/content", {headers: auth()});
      if (!c.ok) { show("failed", "download failed: " + c.status); return; }
      const video = $("video");
      video.src = URL.createObjectURL(await c.blob());
      video.hidden = false;
      $("submit").disabled = false;
      return;
    }
    if (job.status === "failed") { $("submit").disabled = false; return; }
    await new Promise((done) => setTimeout(done, 300));
  }
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = new FormData();
  for (const el of $("form").querySelectorAll("[data-param]")) {
    if (el.type === "file") { if (el.files.length) body.append(el.name, el.files[0]); }
    else if (el.value !== "") { body.append(el.name, el.value); }
  }
  $("submit").disabled = true;
  $("video").hidden = true;
  $("progress").value = 0;
  show("submitting", "");
  try {
    const r = await fetch("/v1/videos", {method: "POST", headers: auth(), body: body});
    const job = await r.json();
    if (!r.ok) { show("refused (" + r.status + ")", job.error ? job.error.message : r.statusText);
                 $("submit").disabled = false; return; }
    $("job-id").textContent = job.id;
    await poll(job.id);
  } catch (err) { show("error", String(err)); $("submit").disabled = false; }
});
"""


def _field(plan: Plan, name: str) -> str:
    spec = plan.layer3_user_interface.parameters[name]
    e = html.escape
    label = e(name.replace("_", " "))
    help_text = e(spec.description or "")
    required = " required" if spec.required else ""
    common = f'id="field-{e(name)}" name="{e(name)}" data-param="{e(name)}"{required}'
    if name == "image":
        common = f'id="field-{e(name)}" name="{IMAGE_FIELD}" data-param="{e(name)}"{required}'
        control = f'<input type="file" accept="image/png,image/jpeg,image/webp" {common}>'
    elif spec.type == "choice":
        options = "".join(f'<option value="{e(c)}"{" selected" if c == spec.default else ""}>{e(c)}</option>'
                          for c in spec.choices or [])
        control = f"<select {common}>{options}</select>"
    elif spec.type == "integer":
        bounds = "".join(f' {attr}="{value}"' for attr, value in (("min", spec.minimum), ("max", spec.maximum))
                         if value is not None)
        default = "" if spec.default is None else f' placeholder="{e(str(spec.default))}"'
        control = f'<input type="number" step="1"{bounds}{default} {common}>'
    else:
        default = spec.default or (plan.layer2_inference_config.negative_prompt if name == "negative_prompt" else "")
        placeholder = f' placeholder="{e(str(default))}"' if default else ""
        control = f'<textarea rows="2" maxlength="10000"{placeholder} {common}></textarea>'
    return (f'<label for="field-{e(name)}">{label}</label>{control}'
            f'<small>{help_text}</small>')


def render_page(plan: Plan, key_required: bool = False) -> str:
    order = ("prompt", "image", "negative_prompt", "seed", "resolution", "aspect_ratio")
    specs = plan.layer3_user_interface.parameters
    names = sorted(specs, key=lambda n: order.index(n) if n in order else len(order))
    fields = "\n".join(f'<div class="field">{_field(plan, n)}</div>' for n in names)
    key = ('<div class="field"><label for="api-key">API key</label><input type="password" id="api-key" '
           'autocomplete="off"><small>This service needs its key (kept in this tab only).</small></div>'
           if key_required else "")
    l2 = plan.layer2_inference_config
    title = html.escape(f"TeleFuser: {plan_name(plan)}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }}
.field {{ display: grid; gap: .2rem; margin-bottom: .8rem; }}
small {{ color: #666; }} textarea, input, select {{ font: inherit; }}
progress {{ width: 100%; }} video {{ width: 100%; margin-top: 1rem; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{html.escape(plan.pipeline_type)}: {l2.num_frames} frames at {l2.fps} fps ({plan_seconds(plan)} s),
{l2.num_inference_steps} steps. Plan {html.escape(plan.plan_hash[:12])}.</p>
<form id="form">
{key}
{fields}
<button id="submit" type="submit">Generate</button>
</form>
<p>Job <code id="job-id">-</code>: <span id="status">idle</span></p>
<progress id="progress" max="100" value="0"></progress>
<p id="message" role="alert"></p>
<video id="video" controls loop hidden></video>
<script>{_SCRIPT}</script>
</body></html>
"""
