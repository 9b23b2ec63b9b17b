//! What the web page (issue 17) needs from the public API, through the
//! router: the page itself without a key, the model families' defaults in
//! `GET /v1/models`, a queued job's place in the queue, and the gallery's
//! paging, filters and delete on `/v1/assets`. The page itself is tested in
//! a browser by `tools/ui-e2e.sh`.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use easel_server::config::{Config, EngineKind};
use serde_json::{json, Value};

mod common;
use common::{fixtures, TestServer as Server};

impl Server {
    /// A server with the page's configuration: the fixture models only.
    async fn page(tweak: impl FnOnce(&mut Config)) -> Server {
        Self::new(|c| {
            let defaults = Config::default();
            c.models_dirs = vec![fixtures().join("models")];
            c.webhook_secret = defaults.webhook_secret;
            c.webhook_backoff_ms = defaults.webhook_backoff_ms;
            tweak(c);
        })
        .await
    }

    /// [`Server::page`] on the fake engine, `step_ms` per step.
    async fn fake_ms(step_ms: u64) -> Server {
        Self::page(|c| {
            c.engine = EngineKind::Fake;
            c.fake_step_ms = step_ms;
        })
        .await
    }

    /// Submit one definition; the job id.
    async fn submit(&self, definition: Value) -> String {
        let (status, job) = self
            .call(
                Method::POST,
                "/v1/generations",
                Some(json!({"images": [definition]})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    async fn wait_status(&self, id: &str, want: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = self.get(&format!("/v1/generations/{id}")).await;
            if want.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never {want:?}: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_are_served_without_a_key() {
    let server = Server::fake_ms(1).await;
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    let (status, headers, body) = server.send(get("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains(r#"<script type="module" src="/ui/main.js">"#));
    // Nothing from another origin: no CDN, no network but this server.
    assert!(
        !html.contains("https://") && !html.contains("http://"),
        "{html}"
    );

    let (status, headers, body) = server.send(get("/ui/generate.js")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    assert!(String::from_utf8(body).unwrap().contains("/v1/generations"));

    let (status, _, body) = server.send(get("/ui/missing.js")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "not_found");

    // The API behind the page still needs the key (the page's probe).
    let (status, _, _) = server.send(get("/v1/usage")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_carry_their_family_defaults() {
    let server = Server::page(|_| {}).await;
    let (status, list) = server.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let entry = |id: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {list}"))["defaults"]
            .clone()
    };
    let sd = entry("tiny-sd15");
    assert_eq!(sd["family"], "stable_diffusion");
    assert_eq!(
        (sd["steps"].as_u64(), sd["guidance_scale"].as_f64()),
        (Some(25), Some(7.5))
    );
    assert_eq!(
        (sd["negative_prompt"].as_bool(), sd["mask"].as_str()),
        (Some(true), Some("optional"))
    );
    assert_eq!(sd["size_multiple"], 8);
    assert!(sd["schedulers"]
        .as_array()
        .unwrap()
        .contains(&json!("euler")));
    let sdxl = entry("tiny-sdxl");
    assert_eq!(sdxl["family"], "stable_diffusion_xl");
    let flux = entry("tiny-flux-dev");
    assert_eq!(
        (flux["steps"].clone(), flux["guidance_scale"].clone()),
        (Value::Null, Value::Null)
    );
    assert_eq!(
        (flux["negative_prompt"].as_bool(), flux["mask"].as_str()),
        (Some(false), Some("refused"))
    );
    assert_eq!(flux["size_multiple"], 16);
    assert_eq!(flux["schedulers"], json!(["flow_match_euler"]));
    let fill = entry("tiny-flux-fill");
    assert_eq!(
        (fill["mask"].as_str(), fill["strength"].as_f64()),
        (Some("required"), Some(1.0))
    );

    // The OpenAPI document describes what the page relies on.
    let (_, doc) = server.get("/openapi.json").await;
    assert!(
        doc["components"]["schemas"]["FamilyDefaults"]["properties"]["negative_prompt"].is_object()
    );
    assert!(
        doc["components"]["schemas"]["GenerationRecord"]["properties"]["queue_position"]
            .is_object()
    );
    assert!(doc["paths"]["/v1/assets/{id}"]["delete"]["responses"]["204"].is_object());
    assert!(doc["components"]["schemas"]["LoraEntry"]["properties"]["family"].is_object());
    assert!(doc["paths"]["/v1/loras"]["get"].is_object());
    let params: Vec<&str> = doc["paths"]["/v1/assets"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in ["limit", "offset", "prompt", "model"] {
        assert!(params.contains(&name), "{params:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_report_their_place_in_the_queue() {
    let server = Server::fake_ms(50).await;
    let slow = json!({"baseModel": "fake/model", "prompt": "a", "steps": 60});
    let ids = [
        server.submit(slow.clone()).await,
        server.submit(slow.clone()).await,
        server.submit(slow).await,
    ];
    let running = server.wait_status(&ids[0], &["running"]).await;
    assert_eq!(running["queue_position"], Value::Null);
    for (id, place) in [(&ids[1], 1), (&ids[2], 2)] {
        let (_, job) = server.get(&format!("/v1/generations/{id}")).await;
        assert_eq!(
            (job["status"].as_str(), job["queue_position"].as_i64()),
            (Some("queued"), Some(place)),
            "{job}"
        );
    }
    // The list shows the same records.
    let (_, list) = server.get("/v1/generations?status=queued").await;
    let places: Vec<i64> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["queue_position"].as_i64().unwrap())
        .collect();
    assert_eq!(places, vec![2, 1]);
    // Canceling the first queued job moves the next one up.
    let (s, _) = server
        .call(
            Method::POST,
            &format!("/v1/generations/{}/cancel", ids[1]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, job) = server.get(&format!("/v1/generations/{}", ids[2])).await;
    assert_eq!(job["queue_position"], 1);
    for id in [&ids[2], &ids[0]] {
        server
            .call(Method::POST, &format!("/v1/generations/{id}/cancel"), None)
            .await;
        let job = server.wait_status(id, &["canceled"]).await;
        assert_eq!(job["queue_position"], Value::Null);
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_page_filter_by_prompt_and_model_and_delete() {
    let server = Server::fake_ms(1).await;
    let mut jobs = Vec::new();
    for (prompt, model, batch) in [
        ("A red Fox", "fake/a", 2),
        ("a lighthouse, 100% dusk", "fake/b", 1),
        ("another red fox", "fake/b", 1),
    ] {
        let id = server
            .submit(json!({"baseModel": model, "prompt": prompt, "seed": 1, "batchSize": batch, "steps": 2}))
            .await;
        server.wait_status(&id, &["succeeded"]).await;
        jobs.push(id);
    }
    let (status, all) = server.get("/v1/assets").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let all = ids(&all);
    assert_eq!(all.len(), 4);
    // Newest first: the last job's image leads.
    let (_, first) = server.get(&format!("/v1/assets/{}", all[0])).await;
    assert_eq!(first["generation_id"], jobs[2].as_str());

    // Pages of two follow one another without gaps or repeats.
    let (_, p1) = server.get("/v1/assets?limit=2").await;
    let (_, p2) = server.get("/v1/assets?limit=2&offset=2").await;
    let (_, p3) = server.get("/v1/assets?limit=2&offset=4").await;
    assert_eq!([ids(&p1), ids(&p2)].concat(), all);
    assert!(ids(&p3).is_empty());

    let count = |q: &'static str| {
        let server = &server;
        async move {
            let (status, list) = server.get(&format!("/v1/assets?{q}")).await;
            assert_eq!(status, StatusCode::OK, "{q}: {list}");
            ids(&list).len()
        }
    };
    assert_eq!(count("prompt=RED%20FOX").await, 3);
    assert_eq!(count("prompt=100%25").await, 1, "`%` matches itself");
    assert_eq!(count("prompt=1_0").await, 0, "`_` matches itself");
    assert_eq!(count("model=fake/b").await, 2);
    assert_eq!(count("model=fake/b&prompt=fox").await, 1);
    assert_eq!(count("model=fake/c").await, 0);
    let (status, error) = server.get("/v1/assets?offset=-1").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["field"], "offset");

    // Delete one of job 0's two images: only its owner may.
    let (_, job0) = server.get(&format!("/v1/generations/{}", jobs[0])).await;
    let gone = job0["assets"][0].clone();
    let gone_id = gone["id"].as_str().unwrap();
    let other_key = Server::add_key(&server.state, None).await;
    let (s, _, _) = server
        .call_as(
            Some(&other_key),
            Method::DELETE,
            &format!("/v1/assets/{gone_id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another key cannot delete it");
    let (s, body) = server
        .call(Method::DELETE, &format!("/v1/assets/{gone_id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (s, _) = server.get(&format!("/v1/assets/{gone_id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, after) = server.get("/v1/assets").await;
    assert!(!ids(&after).iter().any(|i| i == gone_id));
    assert_eq!(ids(&after).len(), 3);
    let (_, job0) = server.get(&format!("/v1/generations/{}", jobs[0])).await;
    assert_eq!(job0["assets"].as_array().unwrap().len(), 1);
    // Its file went with it (nothing else names those bytes)...
    let hash = gone["content_hash"].as_str().unwrap();
    let files = server.state.assets();
    assert!(
        !files.exists(hash, "webp").await.unwrap(),
        "{hash} still there"
    );
    let (s, _) = server
        .call(Method::DELETE, &format!("/v1/assets/{gone_id}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // ...but a file another record names stays: job 2's image given as
    // the init image of a new job is stored as that job's input, by hash.
    let (_, job2) = server.get(&format!("/v1/generations/{}", jobs[2])).await;
    let kept = &job2["assets"][0];
    let reuse = server
        .submit(json!({"baseModel": "fake/b", "prompt": "x", "steps": 2, "image": kept["id"]}))
        .await;
    let reuse = server.wait_status(&reuse, &["succeeded"]).await;
    let input = reuse["images"][0]["requested"]["image"].as_str().unwrap();
    let (_, input) = server.get(&format!("/v1/assets/{input}")).await;
    assert_eq!(
        (input["kind"].as_str(), &input["content_hash"]),
        (Some("input"), &kept["content_hash"])
    );
    let kept_hash = kept["content_hash"].as_str().unwrap();
    let (s, _) = server
        .call(
            Method::DELETE,
            &format!("/v1/assets/{}", kept["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        files.exists(kept_hash, "webp").await.unwrap(),
        "the input record still names the file"
    );
    // Inputs are not the gallery's to delete.
    let (s, _) = server
        .call(
            Method::DELETE,
            &format!("/v1/assets/{}", input["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_files_of_the_model_folders_are_listed_by_the_name_loras_path_takes() {
    let root = tempfile::tempdir().unwrap();
    let loras = root.path().join("models/Lora");
    std::fs::create_dir_all(&loras).unwrap();
    let source = fixtures().join("loras/tiny-sd15-lora.safetensors");
    std::fs::copy(&source, loras.join("detail.safetensors")).unwrap();
    let root_path = root.path().to_path_buf();
    let server = Server::page(move |c| c.models_dirs.push(root_path)).await;

    let (status, list) = server.get("/v1/loras").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{list}");
    assert_eq!(data[0]["id"], "detail");
    assert_eq!(data[0]["object"], "lora");
    assert_eq!(data[0]["format"], "safetensors");
    assert_eq!(
        data[0]["size_bytes"].as_u64(),
        Some(std::fs::metadata(&source).unwrap().len())
    );
    // That name is what a request's loras[].path takes.
    let id = server
        .submit(
            json!({"baseModel": "tiny-sd15", "prompt": "a", "steps": 1, "width": 64,
                       "height": 64, "loras": [{"path": "detail", "scale": 0.5}]}),
        )
        .await;
    let job = server.wait_status(&id, &["succeeded", "failed"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["images"][0]["parameters"]["loras"][0]["scale"], 0.5);
    // Without a key: 401, as every /v1 route.
    let (status, _, _) = server
        .send(Request::get("/v1/loras").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_lists_charges_and_refunds_newest_first() {
    let server = Server::fake_ms(20).await;
    let done = server
        .submit(json!({"baseModel": "fake/model", "prompt": "a", "steps": 1}))
        .await;
    server.wait_status(&done, &["succeeded"]).await;
    let canceled = server
        .submit(json!({"baseModel": "fake/model", "prompt": "b", "steps": 60}))
        .await;
    server.wait_status(&canceled, &["running"]).await;
    server
        .call(
            Method::POST,
            &format!("/v1/generations/{canceled}/cancel"),
            None,
        )
        .await;
    server.wait_status(&canceled, &["canceled"]).await;

    let (status, list) = server.get("/v1/usage/ledger").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let entries: Vec<(String, String, i64, f64)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["object"], "ledger_entry");
            (
                e["generation_id"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["inferences"].as_i64().unwrap(),
                e["amount_usd"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (canceled.clone(), "refund".into(), 1, 0.02),
            (canceled.clone(), "charge".into(), 1, 0.02),
            (done.clone(), "charge".into(), 1, 0.02),
        ]
    );
    let (_, page) = server.get("/v1/usage/ledger?limit=1&offset=2").await;
    assert_eq!(page["data"][0]["generation_id"], done.as_str());
    let (status, error) = server.get("/v1/usage/ledger?offset=-1").await;
    assert_eq!(
        (status, error["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("offset"))
    );
    // Another key sees none of it.
    let other = Server::add_key(&server.state, None).await;
    let (_, _, theirs) = server
        .call_as(Some(&other), Method::GET, "/v1/usage/ledger", None)
        .await;
    assert_eq!(theirs["data"], json!([]));
}
