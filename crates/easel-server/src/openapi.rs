//! `/openapi.json`, generated from the handlers' annotations and the
//! request/response types, and `/docs`, a page that renders it (no
//! external scripts: it works offline).

use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use easel_core::{ImageDefinition, LoraRef};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::{ErrorBody, ErrorDetail};
use crate::job::{ItemStatus, JobError, JobStatus, Progress, ResolvedLora, ResolvedParameters};
use crate::models::ModelEntry;
use crate::openai::ImagesRequest;
use crate::views::{
    AssetRecord, Cost, GenerationRecord, ImageResult, JobLinks, PackRecord, TrainingRecord,
    UsageRecord,
};

/// The body of `POST /v1/generations` (documentation type): every image
/// field may also be given at the top level as a default for all images.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationRequestDoc {
    /// Request-wide defaults: any image field.
    #[serde(flatten)]
    pub defaults: ImageDefinition,
    /// The image definitions (at least one, unless `inferencePackId` gives some).
    pub images: Vec<ImageDefinition>,
    /// An inference pack whose definitions run first.
    pub inference_pack_id: Option<String>,
    /// An http(s) URL to POST signed events to.
    pub webhook: Option<String>,
    /// Events to send: `start`, `progress`, `completed` (default `completed`).
    pub webhook_events: Option<Vec<String>>,
}

/// The body of `POST /v1/inference-packs` (documentation type).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackRequestDoc {
    /// A label.
    pub name: String,
    /// Defaults for the pack's images: any image field.
    #[serde(flatten)]
    pub defaults: ImageDefinition,
    /// The pack's image definitions.
    pub images: Vec<ImageDefinition>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `easel keys create`"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "easel",
        description = "Self-hosted image generation: durable jobs with asset records \
            (native API) and OpenAI Images compatibility. Errors are \
            `{\"error\": {\"code\", \"message\", \"field\"}}`; see docs/API.md."
    ),
    paths(
        crate::api::healthz,
        crate::api::readyz,
        crate::api::metrics,
        crate::api::create_generation,
        crate::api::list_generations,
        crate::api::get_generation,
        crate::api::cancel_generation,
        crate::api::generation_events,
        crate::api::list_assets,
        crate::api::get_asset,
        crate::api::get_asset_file,
        crate::api::get_file,
        crate::api::list_models,
        crate::api::create_training,
        crate::api::list_trainings,
        crate::api::get_training,
        crate::api::delete_training,
        crate::api::create_pack,
        crate::api::list_packs,
        crate::api::get_pack,
        crate::api::delete_pack,
        crate::api::get_usage,
        crate::openai::generations,
        crate::openai::edits,
        crate::flows::create_flow,
        crate::flows::list_flows,
        crate::flows::get_flow,
        crate::flows::delete_flow,
        crate::flows::create_run,
        crate::flows::list_runs,
        crate::flows::get_run,
        crate::flows::cancel_run,
        crate::flows::run_events,
    ),
    components(schemas(
        GenerationRequestDoc, PackRequestDoc, ImageDefinition, LoraRef, GenerationRecord,
        ImageResult, AssetRecord, Cost, JobLinks, JobStatus, ItemStatus, JobError, Progress,
        ResolvedParameters, ResolvedLora, TrainingRecord, PackRecord, UsageRecord, ModelEntry,
        ErrorBody, ErrorDetail, ImagesRequest, crate::flows::FlowRecord,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// `GET /docs`: the endpoints, their parameters and schemas, rendered in
/// the browser from `/openapi.json`.
pub async fn docs_page() -> Html<&'static str> {
    Html(DOCS_HTML)
}

const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>easel API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;border-radius:4px}
pre{padding:.6em;overflow:auto} .op{border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.2em .8em}
.m{display:inline-block;min-width:4.5em;font-weight:700;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.delete{color:#c33} .tag{margin-top:1.6em;border-bottom:2px solid #eee}
details summary{cursor:pointer}
</style></head><body>
<h1>easel API</h1>
<p>Generated from <a href="/openapi.json">/openapi.json</a>. Authenticate with
<code>Authorization: Bearer &lt;key&gt;</code> (<code>easel keys create</code>). Errors are
<code>{"error": {"code", "message", "field"}}</code>.</p>
<div id="out">Loading…</div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
  const out=document.getElementById('out'); out.textContent='';
  const esc=s=>String(s??'').replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));
  const byTag={};
  for(const [path,item] of Object.entries(doc.paths)){
    for(const [method,op] of Object.entries(item)){
      const tag=(op.tags||['other'])[0]; (byTag[tag]=byTag[tag]||[]).push([method,path,op]);
    }
  }
  for(const [tag,ops] of Object.entries(byTag)){
    const h=document.createElement('h2'); h.className='tag'; h.textContent=tag; out.appendChild(h);
    for(const [method,path,op] of ops){
      const d=document.createElement('div'); d.className='op';
      const params=(op.parameters||[]).map(p=>`<li><code>${esc(p.name)}</code> (${esc(p.in)}) ${esc(p.description)}</li>`).join('');
      const resp=Object.entries(op.responses||{}).map(([c,r])=>`<li><code>${c}</code> ${esc(r.description)}</li>`).join('');
      const body=op.requestBody?`<p>Body: ${esc(op.requestBody.description||Object.keys(op.requestBody.content||{}).join(', '))}</p>`:'';
      d.innerHTML=`<p><span class="m ${method}">${method}</span> <code>${esc(path)}</code> ${op.security?'🔑':''}</p>
        <p>${esc(op.description||op.summary||'')}</p>${body}
        ${params?`<p>Parameters:</p><ul>${params}</ul>`:''}<p>Responses:</p><ul>${resp}</ul>`;
      out.appendChild(d);
    }
  }
  const h=document.createElement('h2'); h.className='tag'; h.textContent='schemas'; out.appendChild(h);
  for(const [name,s] of Object.entries((doc.components||{}).schemas||{})){
    const d=document.createElement('details');
    d.innerHTML=`<summary><code>${esc(name)}</code> ${esc(s.description||'')}</summary><pre>${esc(JSON.stringify(s,null,2))}</pre>`;
    out.appendChild(d);
  }
}).catch(e=>{document.getElementById('out').textContent='Could not load /openapi.json: '+e});
</script></body></html>"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/generations",
            "/v1/generations/{id}",
            "/v1/generations/{id}/events",
            "/v1/generations/{id}/cancel",
            "/v1/assets",
            "/v1/assets/{id}",
            "/v1/models",
            "/v1/trainings",
            "/v1/trainings/{id}",
            "/v1/inference-packs",
            "/v1/inference-packs/{id}",
            "/v1/usage",
            "/v1/images/generations",
            "/v1/images/edits",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let image = &schemas["ImageDefinition"]["properties"];
        assert!(image.get("guidanceScale").is_some(), "{image}");
        assert!(image.get("negativePrompt").is_some());
    }
}
