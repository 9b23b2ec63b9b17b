//! The job store's contract, one suite run on SQLite and on a real
//! PostgreSQL server (issue 18): admission inside the transaction (queue
//! limit, credit, idempotency keys) under concurrent submissions, claims
//! that never hand one job to two workers, leases (renewal, cancel seen
//! through the lease, a lost lease refusing writes, reclaim after expiry
//! with attempts counted and refunds), webhook deliveries claimed once,
//! and the dialect-specific queries (JSON fields, case-insensitive search).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::postgres::PgServer;
use easel_server::job::{ItemResult, ItemSpec, JobError, JobStatus};
use easel_server::store::{
    Admission, Admitted, AssetFilter, AssetRow, FlowRow, FlowRunRow, KeyRow, NewGeneration,
    PackRow, Store, StoreError, TrainingRow,
};
use serde_json::json;

const KEY: &str = "key-1";

fn spec(prompt: &str, model: &str) -> ItemSpec {
    serde_json::from_value(json!({
        "field": "images[0]",
        "definition": { "prompt": prompt, "baseModel": model },
        "model": { "reference": model, "load": model, "pipeline_class": null },
        "loras": [],
        "seed": 7,
        "batch_size": 1,
        "width": null,
        "height": null,
        "image": null,
        "mask": null
    }))
    .expect("an ItemSpec")
}

fn new_generation(id: &str, items: usize, idempotency_key: Option<&str>) -> NewGeneration {
    NewGeneration {
        id: id.into(),
        key_id: KEY.into(),
        source: "native".into(),
        request_json: "{}".into(),
        items: (0..items)
            .map(|i| spec(&format!("A Red Fox {i}"), "sd15"))
            .collect(),
        price_micros: 1000,
        idempotency_key: idempotency_key.map(Into::into),
        request_hash: Some("hash".into()),
        webhook_url: None,
        webhook_events: Vec::new(),
        inputs: Vec::new(),
    }
}

const OPEN: Admission = Admission {
    max_queue: 1000,
    credit_limit_micros: None,
};

async fn created(store: &Store, g: &NewGeneration) -> String {
    match store.insert_generation(g, OPEN).await.unwrap() {
        Admitted::Created(row) => row.id,
        other => panic!("not created: {other:?}"),
    }
}

fn output(generation_id: &str, idx: i64) -> AssetRow {
    AssetRow {
        id: uuid::Uuid::new_v4().to_string(),
        key_id: KEY.into(),
        kind: "output".into(),
        hash: format!("{:064x}", idx + 1),
        extension: "png".into(),
        file_name: "x.png".into(),
        file_size: 3,
        file_type: "image/png".into(),
        width: Some(8),
        height: Some(8),
        seed: Some(u64::MAX),
        generation_id: Some(generation_id.into()),
        item_idx: Some(idx),
        image_idx: Some(0),
        created_at: 1,
    }
}

fn result() -> ItemResult {
    serde_json::from_value(json!({
        "parameters": {
            "prompt": "a red fox", "negativePrompt": null, "baseModel": "sd15",
            "pipeline": "StableDiffusionPipeline", "steps": 4, "guidanceScale": 7.5,
            "width": 8, "height": 8, "scheduler": "euler", "seed": 7, "seeds": [7],
            "batchSize": 1, "strength": null, "loras": [], "outputFormat": "png",
            "outputQuality": 80, "precision": "fp32", "computePrecision": "fp32"
        },
        "warnings": []
    }))
    .expect("an ItemResult")
}

async fn suite(store: Store) {
    store
        .insert_key(
            &KeyRow {
                id: KEY.into(),
                name: "test".into(),
                prefix: "ek_".into(),
                credit_limit_micros: Some(5000),
                created_at: 1,
                revoked_at: None,
            },
            "secret-hash",
        )
        .await
        .unwrap();
    assert_eq!(
        store.key_by_hash("secret-hash").await.unwrap().unwrap().id,
        KEY
    );

    admission(&store).await;
    concurrent_admission(&store).await;
    claims_are_exclusive(&store).await;
    leases(&store).await;
    reclaim(&store).await;
    deliveries(&store).await;
    search(&store).await;
}

/// Queue limit, credit and idempotency keys, decided inside the insert.
async fn admission(store: &Store) {
    let first = new_generation("adm-1", 2, Some("idem-1"));
    let limits = Admission {
        max_queue: 2,
        credit_limit_micros: Some(5000),
    };
    let Admitted::Created(row) = store.insert_generation(&first, limits).await.unwrap() else {
        panic!("the first job is admitted")
    };
    assert_eq!(row.status, JobStatus::Queued);
    // The same idempotency key: the stored job, nothing new.
    let again = new_generation("adm-1b", 2, Some("idem-1"));
    match store.insert_generation(&again, limits).await.unwrap() {
        Admitted::Existing(existing) => assert_eq!(existing.id, "adm-1"),
        other => panic!("expected the existing job, got {other:?}"),
    }
    // Credit: 2 inferences at 1000 used of 5000; 4 more would pass it.
    match store
        .insert_generation(&new_generation("adm-2", 4, None), limits)
        .await
        .unwrap()
    {
        Admitted::InsufficientCredit { used_micros } => assert_eq!(used_micros, 2000),
        other => panic!("expected insufficient credit, got {other:?}"),
    }
    let _ = created(store, &new_generation("adm-3", 1, None)).await;
    // Two queued now: the queue is full at max_queue = 2.
    match store
        .insert_generation(&new_generation("adm-4", 1, None), limits)
        .await
        .unwrap()
    {
        Admitted::QueueFull { queued } => assert_eq!(queued, 2),
        other => panic!("expected a full queue, got {other:?}"),
    }
    // Refunds count back: cancel both, and the credit is whole again.
    let canceled = JobError::new("canceled", "test");
    assert!(store.cancel_queued("adm-1", &canceled).await.unwrap());
    assert!(store.cancel_queued("adm-3", &canceled).await.unwrap());
    assert!(!store.cancel_queued("adm-3", &canceled).await.unwrap());
    let usage = store.usage(KEY).await.unwrap();
    assert_eq!(usage.charged_micros, 3000);
    assert_eq!(usage.refunded_micros, 3000);
    assert_eq!(usage.inferences_refunded, 3);
    assert_eq!(store.counts().await.unwrap(), (0, 0));
}

/// Twenty submissions at once against room for five: exactly five are
/// admitted, and ten with one idempotency key make one job.
async fn concurrent_admission(store: &Store) {
    let limits = Admission {
        max_queue: 5,
        credit_limit_micros: None,
    };
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let g = new_generation(&format!("race-{i}"), 1, None);
            store.insert_generation(&g, limits).await.unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Admitted::Created(_)) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "admissions past max_queue");
    let canceled = JobError::new("canceled", "test");
    for i in 0..20 {
        let _ = store
            .cancel_queued(&format!("race-{i}"), &canceled)
            .await
            .unwrap();
    }

    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let g = new_generation(&format!("idem-race-{i}"), 1, Some("same-key"));
            store.insert_generation(&g, OPEN).await.unwrap()
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Admitted::Created(row) | Admitted::Existing(row) => {
                ids.insert(row.id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        ids.len(),
        1,
        "one idempotency key made several jobs: {ids:?}"
    );
    let id = ids.into_iter().next().unwrap();
    assert!(store.cancel_queued(&id, &canceled).await.unwrap());
}

/// Four claimers on one queue of 24 jobs: every job claimed exactly once.
async fn claims_are_exclusive(store: &Store) {
    for i in 0..24 {
        created(store, &new_generation(&format!("claim-{i}"), 1, None)).await;
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("worker-{w}");
            let mut mine = Vec::new();
            while let Some(claim) = store
                .claim(&owner, Duration::from_secs(60), 8, |q| {
                    q.first().map(|j| j.0.clone())
                })
                .await
                .unwrap()
            {
                assert_eq!(claim.attempt, 1);
                mine.push(claim.id);
            }
            (owner, mine)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (owner, mine) = t.await.unwrap();
        for id in &mine {
            assert!(store
                .finish_held(id, &owner, JobStatus::Succeeded, None)
                .await
                .unwrap());
        }
        all.extend(mine);
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 24, "claims: {all:?}");
    assert_eq!(unique.len(), 24, "a job was claimed twice");
    // The choice is the caller's: a later job can be taken over the head.
    created(store, &new_generation("pick-a", 1, None)).await;
    created(store, &new_generation("pick-b", 1, None)).await;
    let claim = store
        .claim("w", Duration::from_secs(60), 8, |q| {
            assert_eq!(q.len(), 2);
            Some(q[1].0.clone())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.id, "pick-b");
    assert!(store.release("pick-b", "w").await.unwrap());
    let canceled = JobError::new("canceled", "test");
    assert!(store.cancel_queued("pick-a", &canceled).await.unwrap());
    assert!(store.cancel_queued("pick-b", &canceled).await.unwrap());
}

/// Renewal, cancel through the lease, and writes refused without it.
async fn leases(store: &Store) {
    let id = created(store, &new_generation("lease-1", 2, None)).await;
    let claim = store
        .claim("owner-a", Duration::from_secs(60), 8, |q| {
            q.first().map(|j| j.0.clone())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.id, id);
    let lease = Duration::from_secs(60);
    assert_eq!(
        store.renew_lease(&id, "owner-a", lease).await.unwrap(),
        Some(false)
    );
    assert_eq!(
        store.renew_lease(&id, "owner-b", lease).await.unwrap(),
        None
    );
    // Another owner's writes are refused and change nothing.
    let refused = store
        .complete_item(&id, "owner-b", 0, &[output(&id, 0)], &result())
        .await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost(_))),
        "{refused:?}"
    );
    assert!(store.assets_of(&id).await.unwrap().is_empty());
    store
        .complete_item(&id, "owner-a", 0, &[output(&id, 0)], &result())
        .await
        .unwrap();
    assert_eq!(store.assets_of(&id).await.unwrap().len(), 1);
    // A cancel asked anywhere reaches the holder through its renewal.
    store.request_cancel(&id).await.unwrap();
    assert_eq!(
        store.renew_lease(&id, "owner-a", lease).await.unwrap(),
        Some(true)
    );
    assert!(!store
        .finish_held(&id, "owner-b", JobStatus::Canceled, None)
        .await
        .unwrap());
    assert!(store
        .finish_held(&id, "owner-a", JobStatus::Canceled, None)
        .await
        .unwrap());
    let items = store.items(&id).await.unwrap();
    assert_eq!(items[0].status.as_str(), "succeeded");
    assert_eq!(items[1].status.as_str(), "canceled");
    // Finished: no lease left to renew.
    assert_eq!(
        store.renew_lease(&id, "owner-a", lease).await.unwrap(),
        None
    );
}

/// Expired leases: re-queued with the finished images kept, the old
/// holder's writes refused, failed after max_attempts, canceled when asked.
async fn reclaim(store: &Store) {
    let short = Duration::from_millis(1);
    let id = created(store, &new_generation("reclaim-1", 2, None)).await;
    let take = |owner: &'static str| {
        let store = store.clone();
        async move {
            store
                .claim(owner, short, 8, |q| {
                    q.iter().find(|j| j.0 == "reclaim-1").map(|j| j.0.clone())
                })
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(take("dead-1").await.attempt, 1);
    store
        .complete_item(&id, "dead-1", 0, &[output(&id, 0)], &result())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = store.reclaim_expired(3).await.unwrap();
    assert_eq!((r.requeued, r.failed, r.canceled), (1, 0, 0));
    // A second reclaimer finds nothing more to do.
    assert_eq!(store.reclaim_expired(3).await.unwrap().requeued, 0);
    let g = store.generation(&id).await.unwrap().unwrap();
    assert_eq!(g.status, JobStatus::Queued);
    let refused = store
        .complete_item(&id, "dead-1", 1, &[output(&id, 1)], &result())
        .await;
    assert!(matches!(refused, Err(StoreError::LeaseLost(_))));
    // The finished definition kept its image.
    assert_eq!(store.assets_of(&id).await.unwrap().len(), 1);
    assert_eq!(
        store.items(&id).await.unwrap()[0].status.as_str(),
        "succeeded"
    );
    assert_eq!(take("dead-2").await.attempt, 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.reclaim_expired(3).await.unwrap();
    assert_eq!(take("dead-3").await.attempt, 3);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = store.reclaim_expired(3).await.unwrap();
    assert_eq!((r.requeued, r.failed, r.canceled), (0, 1, 0));
    assert_eq!(r.finished, vec![(id.clone(), JobStatus::Failed)]);
    let g = store.generation(&id).await.unwrap().unwrap();
    assert_eq!(g.status, JobStatus::Failed);
    assert_eq!(g.error.unwrap().code, "interrupted");

    let id = created(store, &new_generation("reclaim-2", 1, None)).await;
    store
        .claim("dead-4", short, 8, |q| {
            q.iter().find(|j| j.0 == id).map(|j| j.0.clone())
        })
        .await
        .unwrap()
        .unwrap();
    store.request_cancel(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = store.reclaim_expired(3).await.unwrap();
    assert_eq!(r.canceled, 1);
    assert_eq!(
        store.generation(&id).await.unwrap().unwrap().status,
        JobStatus::Canceled
    );
}

/// Two dispatchers claiming the same due deliveries get disjoint sets.
async fn deliveries(store: &Store) {
    for i in 0..10 {
        store
            .enqueue_delivery(&format!("g-{i}"), "http://127.0.0.1:9/", "e", "{}", 3)
            .await
            .unwrap();
    }
    let hold = Duration::from_secs(60);
    let (a, b) = tokio::join!(
        store.claim_due_deliveries(6, hold),
        store.claim_due_deliveries(6, hold)
    );
    let (a, b) = (a.unwrap().0, b.unwrap().0);
    let ids: HashSet<_> = a.iter().chain(&b).map(|d| d.id.clone()).collect();
    assert_eq!(a.len() + b.len(), 10, "{} + {}", a.len(), b.len());
    assert_eq!(ids.len(), 10, "a delivery was claimed twice");
    let (again, next) = store.claim_due_deliveries(16, hold).await.unwrap();
    assert!(again.is_empty(), "held deliveries were claimed again");
    assert!(next.is_some());
}

/// The prompt and model filters of the asset list (JSON fields;
/// case-insensitive like SQLite's LIKE), with `%` taken literally.
async fn search(store: &Store) {
    let mut g = new_generation("search-1", 1, None);
    g.items = vec![spec("100% Crimson VULPES in snow", "sdxl")];
    let id = created(store, &g).await;
    store
        .claim("s", Duration::from_secs(60), 8, |q| {
            q.iter().find(|j| j.0 == id).map(|j| j.0.clone())
        })
        .await
        .unwrap()
        .unwrap();
    let mut asset = output(&id, 0);
    asset.hash = format!("{:064x}", 999);
    store
        .complete_item(&id, "s", 0, &[asset], &result())
        .await
        .unwrap();
    let page = |prompt: Option<&'static str>, model: Option<&'static str>| {
        let store = store.clone();
        async move {
            let filter = AssetFilter {
                limit: 50,
                offset: 0,
                prompt,
                model,
            };
            store.assets_page(KEY, &filter).await.unwrap().len()
        }
    };
    assert_eq!(page(Some("crimson vulpes"), None).await, 1);
    assert_eq!(page(Some("100%"), None).await, 1);
    assert_eq!(page(Some("0% b"), None).await, 0);
    assert_eq!(page(Some("crimson vulpes"), Some("sdxl")).await, 1);
    assert_eq!(page(Some("crimson"), Some("sd15")).await, 0);
    assert!(store
        .known_hashes()
        .await
        .unwrap()
        .contains(&format!("{:064x}", 999)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_contract_on_postgres() {
    let Some(pg) = PgServer::start("store_contract_on_postgres") else {
        return;
    };
    let url = pg.new_database().await;
    let store = Store::connect(&url).await.unwrap();
    // Migrating an already migrated database is a no-op (every node runs it).
    Store::connect(&url).await.unwrap().close().await;
    suite(store).await;
}

/// `easel migrate`'s records: a SQLite store that went through the whole
/// suite copied into PostgreSQL, every table, then again (nothing new:
/// the copy is idempotent), and the copy works as a store (new jobs get
/// fresh sequence numbers, the contents answer the same queries).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_copies_into_postgres() {
    let Some(pg) = PgServer::start("sqlite_store_copies_into_postgres") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let source = Store::open(dir.path()).await.unwrap();
    suite(source.clone()).await;
    // The tables the suite leaves empty.
    source
        .insert_training(&TrainingRow {
            id: "t1".into(),
            key_id: KEY.into(),
            name: "style".into(),
            base_model: "sd15".into(),
            hash: format!("{:064x}", 5),
            file_size: 10,
            created_at: 1,
        })
        .await
        .unwrap();
    source
        .insert_pack(&PackRow {
            id: "p1".into(),
            key_id: KEY.into(),
            name: "pack".into(),
            body_json: "{}".into(),
            image_count: 1,
            created_at: 1,
        })
        .await
        .unwrap();
    source
        .insert_flow(&FlowRow {
            id: "f1".into(),
            key_id: KEY.into(),
            name: None,
            document: "{}".into(),
            step_count: 1,
            created_at: 1,
        })
        .await
        .unwrap();
    let run = FlowRunRow {
        id: "r1".into(),
        flow_id: "f1".into(),
        key_id: KEY.into(),
        document: "{}".into(),
        record_json: "{}".into(),
        cancel_requested: false,
        created_at: 1,
    };
    source.insert_flow_run(&run, "pending").await.unwrap();
    let target = Store::connect(&pg.new_database().await).await.unwrap();
    let first = source.copy_into(&target, |_| {}).await.unwrap();
    let mut tables = 0;
    for t in &first {
        assert_eq!(t.inserted, t.source_rows, "{t:?}");
        let sql = format!("SELECT COUNT(*) FROM {}", t.table);
        assert_eq!(target.scalar_raw(&sql).await.unwrap() as u64, t.source_rows);
        tables += usize::from(t.source_rows > 0);
    }
    assert_eq!(tables, first.len(), "a table was left empty: {first:?}");
    let again = source.copy_into(&target, |_| {}).await.unwrap();
    assert!(again.iter().all(|t| t.inserted == 0), "{again:?}");
    assert_eq!(
        target.usage(KEY).await.unwrap(),
        source.usage(KEY).await.unwrap()
    );
    assert_eq!(
        target.generation("lease-1").await.unwrap(),
        source.generation("lease-1").await.unwrap()
    );
    let max_seq = target
        .scalar_raw("SELECT MAX(seq) FROM generations")
        .await
        .unwrap();
    let id = created(&target, &new_generation("after-copy", 1, None)).await;
    let row = target.generation(&id).await.unwrap().unwrap();
    assert_eq!(row.seq, max_seq + 1);
}

/// LISTEN/NOTIFY: a listener (another process's, in effect) hears a
/// queued job and a cancel with its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_queued_jobs_and_cancels() {
    let Some(pg) = PgServer::start("postgres_notifies_queued_jobs_and_cancels") else {
        return;
    };
    let url = pg.new_database().await;
    let store = Store::connect(&url).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let tx2 = tx.clone();
    let listener = Store::connect(&url)
        .await
        .unwrap()
        .listen(
            move || {
                let _ = tx.send("queued".into());
            },
            move |id| {
                let _ = tx2.send(format!("cancel {id}"));
            },
        )
        .expect("a listener on PostgreSQL");
    // The listener subscribes in its own task: retry until it hears.
    let mut heard = None;
    for i in 0..50 {
        created(&store, &new_generation(&format!("notify-{i}"), 1, None)).await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            heard = Some(m);
            break;
        }
    }
    assert_eq!(heard.as_deref(), Some("queued"));
    while rx.try_recv().is_ok() {}
    store.request_cancel("notify-0").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the cancel was heard")
        .unwrap();
    assert_eq!(m, "cancel notify-0");
    listener.abort();
    // SQLite has no listener: its one process wakes its own workers.
    let dir = tempfile::tempdir().unwrap();
    assert!(Store::open(dir.path())
        .await
        .unwrap()
        .listen(|| {}, |_| {})
        .is_none());
}

/// A PostgreSQL restart: statements fail while it is down (as
/// "unavailable", so the API answers 503), and the same store works again
/// once it is back, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived() {
    let Some(pg) = PgServer::start("postgres_restart_is_survived") else {
        return;
    };
    let url = pg.new_database().await;
    let store = Store::connect(&url).await.unwrap();
    let id = created(&store, &new_generation("before-restart", 1, None)).await;
    pg.stop();
    let down = store.generation(&id).await;
    match down {
        Err(e) => assert!(e.is_unavailable(), "not reported as unavailable: {e:?}"),
        Ok(_) => panic!("a statement succeeded with the server down"),
    }
    pg.start_again();
    let mut back = None;
    for _ in 0..50 {
        if let Ok(row) = store.generation(&id).await {
            back = row;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        back.expect("the job after the restart").status,
        JobStatus::Queued
    );
}
