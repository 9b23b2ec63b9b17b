//! Flows end to end: the seed's two example flows on a fake image backend
//! (and a chat-completions server on 127.0.0.1), validation errors,
//! `onFailure`, cancellation, events, resuming.

mod support;

use std::sync::{Arc, Mutex};

use easel_flow::{
    ChatConfig, FlowDocument, FlowError, FlowEvent, FlowRun, FlowRunner, NoImageBackend,
    ResponseFormat, RunOptions, RunStatus, Step, StepContext, StepError, StepOutput, StepRegistry,
    StepStatus,
};
use serde_json::{json, Value};
use support::{
    chat_answer, user_message, FakeBackend, FakeChatServer, FakeRegisterTraining, TRAINING_ID,
};

const GENRE_FLOW: &str = include_str!("seed_flows/genre.json5");
const TRAINED_MODEL_FLOW: &str = include_str!("seed_flows/trained_model.json5");

fn runner_with(backend: Arc<FakeBackend>, chat: Option<ChatConfig>) -> FlowRunner {
    let mut registry = StepRegistry::standard(backend, chat);
    registry.register("RegisterTraining", FakeRegisterTraining::default());
    FlowRunner::new(registry)
}

fn run_ok(runner: &FlowRunner, text: &str, input: Value) -> FlowRun {
    let flow = runner.load(text).unwrap_or_else(|e| panic!("{e}"));
    runner
        .run(&flow, input, &RunOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Answers every request with `count` prompts about the user message.
fn prompt_server(count: usize, max_requests: usize) -> FakeChatServer {
    FakeChatServer::start(max_requests, move |request| {
        let genre = user_message(request);
        let prompts: Vec<String> = (0..count)
            .map(|i| format!("{genre} scene {i}, dramatic light"))
            .collect();
        (200, chat_answer(&json!({ "prompts": prompts }).to_string()))
    })
}

#[test]
fn genre_flow_maps_generated_prompts_into_one_job() {
    let server = prompt_server(40, 1);
    let backend = Arc::new(FakeBackend::default());
    let mut chat = ChatConfig::new(server.url.clone(), "test-model");
    chat.api_key = Some("sk-test".into());
    let runner = runner_with(backend.clone(), Some(chat));

    let run = run_ok(&runner, GENRE_FLOW, json!({ "promptType": "film noir" }));
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");

    // The LLM got the seed's description, the input and the schema.
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(request.body["model"], "test-model");
    assert_eq!(user_message(request), "film noir");
    assert_eq!(request.body["response_format"]["type"], "json_schema");
    let schema = &request.body["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["properties"]["prompts"]["items"]["type"], "string");
    assert_eq!(schema["properties"]["prompts"]["minItems"], 40);
    let system = request.body["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.starts_with("You are an experienced artist"),
        "{system}"
    );
    assert!(system.contains("exactly 40 items"), "{system}");

    // One backend call with 40 image definitions built by @Map.
    let prompts = &run
        .step("promptsGenerator")
        .unwrap()
        .result
        .as_ref()
        .unwrap()["prompts"];
    assert_eq!(prompts.as_array().unwrap().len(), 40);
    let calls = backend.requests();
    assert_eq!(calls.len(), 1, "one job for the whole step");
    let images = calls[0]["images"].as_array().unwrap();
    assert_eq!(images.len(), 40);
    assert_eq!(
        calls[0]["baseModel"],
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    );
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            image,
            &json!({ "prompt": format!("film noir scene {i}, dramatic light"),
                     "negativePrompt": "ugly, blurry", "steps": 30 })
        );
    }

    // One asset per prompt; the result is the array of asset records.
    let step = run.step("dynamicImageGenerator").unwrap();
    assert_eq!(step.status, StepStatus::Succeeded);
    assert_eq!(step.job_id.as_deref(), Some("job-1"));
    let assets = step.result.as_ref().unwrap().as_array().unwrap();
    assert_eq!(assets.len(), 40);
    assert_eq!(
        assets[0],
        json!({ "id": "job-1-asset-0", "file_url": "file:///data/assets/job-1-0-0.webp",
                "file_name": "job-1-0-0.webp", "file_size": 1000, "file_type": "image/webp",
                "prompt": "film noir scene 0, dramatic light", "job_id": "job-1" })
    );
    assert!(step.duration_ms.is_some() && step.started_at.is_some() && step.finished_at.is_some());
}

#[test]
fn trained_model_flow_keeps_per_image_overrides() {
    let backend = Arc::new(FakeBackend::default());
    let training = FakeRegisterTraining::default();
    let mut registry = StepRegistry::standard(backend.clone(), None);
    registry.register("RegisterTraining", training.clone());
    let runner = FlowRunner::new(registry);

    let run = run_ok(
        &runner,
        TRAINED_MODEL_FLOW,
        json!({ "loraFile": "/data/loras/subject.safetensors" }),
    );
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(
        training.calls.lock().unwrap().clone(),
        [json!({ "file": "/data/loras/subject.safetensors", "name": "my subject" })]
    );

    let calls = backend.requests();
    assert_eq!(calls.len(), 1, "one job for both images");
    let request = &calls[0];
    assert_eq!(request["trainingId"], TRAINING_ID);
    assert_eq!(
        request["baseModel"],
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    );
    let images = request["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(
        images[0],
        json!({ "prompt": "A photo of an astronaut riding a horse on mars",
                "negativePrompt": "blurry, deformed", "width": 768, "height": 768,
                "steps": 20, "guidanceScale": 8.0 })
    );
    assert_eq!(
        images[1]["trainingId"],
        "4716c93e-03bc-49cf-921d-203971fe5866"
    );
    assert_eq!(images[1]["baseModel"], "Realistic_Vision_V6.0_B1");
    assert!(images[0].get("trainingId").is_none());

    let step = run.step("generateImages").unwrap();
    let assets = step.result.as_ref().unwrap().as_array().unwrap();
    assert_eq!(assets.len(), 2, "one asset per prompt");
    assert_eq!(assets[1]["prompt"], "A portrait in a sunlit garden");
}

#[test]
fn later_steps_read_asset_records() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend.clone(), None);
    let run = run_ok(
        &runner,
        "{ steps: [
            { id: 'subjects', type: 'List', parameters: { value: '$.input.subjects' } },
            { id: 'gen', type: 'ImageGenerator', parameters: {
                baseModel: '$.input.model',
                images: [ { prompt: 'a title card' },
                          [ '@Map($.results.subjects)', { prompt: 'a photo of {{ $$.name }}', seed: '$$.seed', batchSize: 2 } ] ] } },
            { id: 'summary', type: 'Template', parameters: { template: {
                first: '$.results.gen[0].file_url',
                all: '$.results.gen[*].file_url',
                job: '$.results.gen[0].job_id',
                text: '{{ $.results.gen[1].file_name }} and more' } } },
          ] }",
        json!({ "model": "sd15", "subjects": [{ "name": "a fox", "seed": 1 }, { "name": "an owl", "seed": 2 }] }),
    );
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let request = &backend.requests()[0];
    assert_eq!(request["baseModel"], "sd15");
    assert_eq!(
        request["images"],
        json!([{ "prompt": "a title card" },
               { "prompt": "a photo of a fox", "seed": 1, "batchSize": 2 },
               { "prompt": "a photo of an owl", "seed": 2, "batchSize": 2 }])
    );
    let summary = run.step("summary").unwrap().result.clone().unwrap();
    assert_eq!(summary["first"], "file:///data/assets/job-1-0-0.webp");
    assert_eq!(summary["all"].as_array().unwrap().len(), 5);
    assert_eq!(summary["job"], "job-1");
    assert_eq!(summary["text"], "job-1-1-0.webp and more");
}

#[test]
fn map_over_empty_array_submits_no_job() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend.clone(), None);
    let run = run_ok(
        &runner,
        "{ steps: [ { id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [[ '@Map($.input.prompts)', { prompt: '$$' } ]] } } ] }",
        json!({ "prompts": [] }),
    );
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.step("gen").unwrap().result, Some(json!([])));
    assert!(backend.requests().is_empty());
}

// ---------------------------------------------------------------- failures

/// A flow whose second step (the image step) fails.
fn failing_flow(on_failure: &str) -> String {
    format!(
        "{{ steps: [
            {{ id: 'prompts', type: 'List', parameters: {{ value: ['a', 'b'] }} }},
            {{ id: 'gen', type: 'ImageGenerator', onFailure: '{on_failure}',
               parameters: {{ baseModel: 'm', images: [[ '@Map($.results.prompts)', {{ prompt: '$$' }} ]] }} }},
            {{ id: 'report', type: 'Template', parameters: {{ template: 'gen said: {{{{ $.results.gen }}}}' }} }},
          ] }}"
    )
}

fn failing_backend() -> Arc<FakeBackend> {
    Arc::new(FakeBackend {
        fail_with: Some("parameters.images[1].width: 1001 is not a multiple of 8".into()),
        ..FakeBackend::default()
    })
}

#[test]
fn second_step_fails_with_terminate() {
    let backend = failing_backend();
    let runner = runner_with(backend.clone(), None);
    let run = run_ok(&runner, &failing_flow("terminate"), json!({}));
    assert_eq!(run.status, RunStatus::Failed);
    let statuses: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Skipped
        ]
    );
    let gen = run.step("gen").unwrap();
    assert_eq!(gen.result, None);
    assert_eq!(
        gen.error.as_ref().unwrap().message,
        "parameters.images[1].width: 1001 is not a multiple of 8"
    );
    let error = run.error.as_ref().unwrap();
    assert_eq!(error.step_id.as_deref(), Some("gen"));
    assert_eq!(
        error.message,
        "steps[1] (gen): parameters.images[1].width: 1001 is not a multiple of 8"
    );
    let report = run.step("report").unwrap();
    assert!(report.result.is_none() && report.started_at.is_none());
    assert_eq!(backend.requests().len(), 1);
    // The record as JSON: what `--json` prints and the API returns.
    let record = serde_json::to_value(&run).unwrap();
    assert_eq!(record["status"], "failed");
    assert_eq!(record["steps"][1]["status"], "failed");
    assert_eq!(record["steps"][1]["onFailure"], "terminate");
    assert_eq!(record["steps"][2]["status"], "skipped");
    assert_eq!(record["error"]["stepId"], "gen");
}

#[test]
fn second_step_fails_with_continue() {
    let runner = runner_with(failing_backend(), None);
    let run = run_ok(&runner, &failing_flow("continue"), json!({}));
    assert_eq!(run.status, RunStatus::Succeeded);
    let statuses: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Succeeded
        ]
    );
    let gen = run.step("gen").unwrap();
    let error_record = json!({ "error": { "message": "parameters.images[1].width: 1001 is not a multiple of 8" } });
    assert_eq!(gen.result.as_ref(), Some(&error_record));
    assert!(gen.error.is_some());
    assert_eq!(
        run.step("report").unwrap().result,
        Some(Value::String(format!("gen said: {error_record}")))
    );
    assert!(run.error.is_none());
}

#[test]
fn reference_failures_are_step_failures_naming_the_parameter() {
    let runner = runner_with(Arc::new(FakeBackend::default()), None);
    let run = run_ok(
        &runner,
        "{ steps: [
            { id: 'a', type: 'Constant', parameters: { value: { prompts: 'not a list' } } },
            { id: 'b', type: 'Template', onFailure: 'continue', parameters: { template: [[ '@Map($.results.a.prompts)', '$$' ]] } },
            { id: 'c', type: 'Template', parameters: { template: '$.results.b.prompts' } },
          ] }",
        json!({}),
    );
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.step("b").unwrap().error.as_ref().unwrap().message,
        "parameters.template[0]: @Map path `$.results.a.prompts` selects a string, not an array"
    );
    assert_eq!(
        run.step("c").unwrap().error.as_ref().unwrap().message,
        "parameters.template: `$.results.b.prompts` selects nothing: the result of step `b` has no `prompts` (it has: error)"
    );
}

/// A step that panics: the runner turns it into a failure.
struct Panics;

impl Step for Panics {
    fn run(&self, _parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        panic!("boom")
    }
}

#[test]
fn a_panicking_step_fails_the_step_not_the_process() {
    let mut registry = StepRegistry::with_basic_steps();
    registry.register("Panics", Panics);
    let runner = FlowRunner::new(registry);
    let run = run_ok(&runner, "[{ id: 'p', type: 'Panics' }]", json!({}));
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.steps[0]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("panicked"),
        "{run:?}"
    );
}

// ------------------------------------------------------------- validation

fn validation_errors(text: &str, input: Option<Value>) -> Vec<String> {
    let runner = runner_with(Arc::new(FakeBackend::default()), None);
    let flow = match FlowDocument::parse(text) {
        Ok(flow) => flow,
        Err(FlowError::Invalid(e)) => return e.errors().iter().map(|e| e.to_string()).collect(),
        Err(e) => panic!("{e}"),
    };
    match runner.validate(&flow, input.as_ref()) {
        Ok(()) => Vec::new(),
        Err(e) => e.errors().iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn validation_unknown_type() {
    assert_eq!(
        validation_errors("[{ id: 'a', type: 'ImageGen' }]", None),
        ["steps[0] (a).type: unknown step type `ImageGen` (known: Constant, ImageGenerator, List, ObjectGenerator, RegisterTraining, Template)"]
    );
}

#[test]
fn validation_duplicate_id() {
    assert_eq!(
        validation_errors(
            "[{ id: 'a', type: 'Constant', parameters: { value: 1 } }, { id: 'a', type: 'Constant', parameters: { value: 2 } }]",
            None
        ),
        ["steps[1] (a).id: duplicate step id `a` (also steps[0])"]
    );
}

#[test]
fn validation_reference_to_missing_later_and_own_steps() {
    let errors = validation_errors(
        "[{ id: 'first', type: 'Constant', parameters: { value: ['$.results.second.x', '$.results.first', '{{ $.results.nope }}'] } },
          { id: 'second', type: 'Constant', parameters: { value: 1 } }]",
        None,
    );
    assert_eq!(
        errors,
        [
            "steps[0] (first).parameters.value[0]: reference `$.results.second.x` refers to step `second` (steps[1]), which runs later; a step reads only earlier results",
            "steps[0] (first).parameters.value[1]: reference `$.results.first` refers to this step's own result; a step reads only earlier results",
            "steps[0] (first).parameters.value[2]: reference `$.results.nope` refers to step `nope`, which does not exist (steps: first, second)",
        ]
    );
}

#[test]
fn validation_malformed_jsonpath() {
    let errors = validation_errors(
        "[{ id: 'p', type: 'List', parameters: { value: ['a'] } },
          { id: 'dynamicImageGenerator', type: 'ImageGenerator', parameters: { baseModel: 'm',
            images: [[ '@Map($.results.p[)', { prompt: '$$' } ]], negativePrompt: '$.input..[' } }]",
        None,
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("steps[1] (dynamicImageGenerator).parameters.images[0]: @Map path is malformed: `$.results.p[` is not a valid JSONPath query"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("steps[1] (dynamicImageGenerator).parameters.negativePrompt: `$.input..[` is not a valid JSONPath query"),
        "{errors:?}"
    );
}

#[test]
fn validation_map_over_non_array_input() {
    let flow = "[{ id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [[ '@Map($.input.prompts)', { prompt: '$$' } ]] } }]";
    assert!(
        validation_errors(flow, None).is_empty(),
        "the input is unknown when a flow is stored"
    );
    assert_eq!(
        validation_errors(flow, Some(json!({ "prompts": "one prompt" }))),
        ["steps[0] (gen).parameters.images[0]: @Map path `$.input.prompts` selects a string in the input, not an array"]
    );
    assert_eq!(
        validation_errors(flow, Some(json!({ "prompt": ["x"] }))),
        ["steps[0] (gen).parameters.images[0]: `$.input.prompts` selects nothing: the input has no `prompts` (it has: prompt)"]
    );
}

#[test]
fn validation_other_reference_errors() {
    let errors = validation_errors(
        "[{ id: 'a', type: 'Constant', parameters: { value: { x: '$$.name', y: '$.inputs.name', z: ['a', '@Map($.input.x)'], w: [['@Map($.input.x)']] } } }]",
        None,
    );
    assert_eq!(
        errors,
        [
            "steps[0] (a).parameters.value.w[0]: a @Map item is written `['@Map(<query>)', template]`: two items, but this one has 1",
            "steps[0] (a).parameters.value.x: reference `$$.name`: `$$` is only meaningful inside a @Map template",
            "steps[0] (a).parameters.value.y: reference `$.inputs.name` starts at `inputs`: references start at `$.input` (the run input) or `$.results` (earlier steps' results)",
            "steps[0] (a).parameters.value.z[1]: `@Map(...)` must be the first item of a two-item array `['@Map(<query>)', template]`",
        ]
    );
}

#[test]
fn validation_step_parameters() {
    let errors = validation_errors(
        "[{ id: 'gen', type: 'ImageGenerator', parameters: { images: [{ negativePrompt: 'x' }, 'plain', [ '@Map($.input.p)', { steps: 3 } ]], baseModel: 5 } }]",
        None,
    );
    assert_eq!(
        errors,
        [
            "steps[0] (gen).parameters.baseModel: must be a string, not a number",
            "steps[0] (gen).parameters.images[0].prompt: missing: every image definition has a `prompt`",
            "steps[0] (gen).parameters.images[1]: an image definition is an object with a `prompt`, not a string",
            "steps[0] (gen).parameters.images[2][1].prompt: missing: every image definition has a `prompt`",
        ]
    );
    let errors = validation_errors(
        "[{ id: 'gen', type: 'ImageGenerator', parameters: {} }]",
        None,
    );
    assert!(
        errors[0].starts_with("steps[0] (gen).parameters.images: missing"),
        "{errors:?}"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let errors = validation_errors(
        "[{ id: 'a', type: 'Nope' }, { id: 'b', type: 'Constant', parameters: { value: '$.results.c' } }]",
        None,
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn run_is_refused_before_anything_runs() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend.clone(), None);
    let flow = runner
        .load("[{ id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [{ prompt: '$.input.prompt' }] } }]")
        .unwrap();
    let e = runner
        .run(&flow, json!({}), &RunOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "steps[0] (gen).parameters.images[0].prompt: `$.input.prompt` selects nothing: the input has no `prompt` (it is empty)"
    );
    assert!(backend.requests().is_empty());
}

// --------------------------------------------------------- ObjectGenerator

#[test]
fn object_generator_without_server_is_refused_with_a_clear_message() {
    let runner = runner_with(Arc::new(FakeBackend::default()), None);
    let flow = runner.load(GENRE_FLOW).unwrap();
    let e = runner
        .run(
            &flow,
            json!({ "promptType": "noir" }),
            &RunOptions::default(),
        )
        .unwrap_err();
    assert!(
        e.to_string().starts_with("steps[0] (promptsGenerator): ObjectGenerator needs an OpenAI-compatible chat-completions server"),
        "{e}"
    );
    assert!(e.to_string().contains("EASEL_LLM_URL"), "{e}");
}

#[test]
fn image_steps_without_backend_are_refused() {
    let runner = FlowRunner::new(StepRegistry::standard(Arc::new(NoImageBackend), None));
    let flow = runner
        .load(
            TRAINED_MODEL_FLOW
                .replace("RegisterTraining", "Constant")
                .replace(
                    "parameters: { file: '$.input.loraFile', name: 'my subject' }",
                    "parameters: { value: { id: 'x' } }",
                )
                .as_str(),
        )
        .unwrap();
    let e = runner
        .run(&flow, json!({}), &RunOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("no image backend"), "{e}");
}

#[test]
fn object_generator_falls_back_to_json_object_and_retries_bad_answers() {
    let server = FakeChatServer::start(3, |request| {
        if request.body["response_format"]["type"] == "json_schema" {
            return (
                400,
                json!({ "error": { "message": "response_format json_schema is not supported" } }),
            );
        }
        let asked_again = request.body["messages"].as_array().unwrap().len() > 2;
        if asked_again {
            (
                200,
                chat_answer("```json\n{\"prompts\": [\"a\", \"b\", \"c\", \"d\"]}\n```"),
            )
        } else {
            (200, chat_answer("{\"prompts\": [1, 2]}"))
        }
    });
    let runner = runner_with(
        Arc::new(FakeBackend::default()),
        Some(ChatConfig::new(server.url.clone(), "m")),
    );
    let flow = runner
        .load("[{ id: 'p', type: 'ObjectGenerator', parameters: { amount: 3, input: { genre: '$.input.genre' }, description: 'Prompts.', schema: { type: 'object', properties: { prompts: { type: 'array', items: { type: 'string' } } }, required: ['prompts'] } } }]")
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = RunOptions {
        events: Some(Arc::new(move |e: &FlowEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..RunOptions::default()
    };
    let run = runner
        .run(&flow, json!({ "genre": "western" }), &options)
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(
        run.results()["p"],
        json!({ "prompts": ["a", "b", "c"] }),
        "cut to amount"
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        requests[1].body["response_format"],
        json!({ "type": "json_object" })
    );
    assert_eq!(user_message(&requests[1]), "{\n  \"genre\": \"western\"\n}");
    let retry = requests[2].body["messages"].as_array().unwrap();
    assert!(retry[3]["content"]
        .as_str()
        .unwrap()
        .contains("expected string, got a number"));
    let logs: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            FlowEvent::StepLog { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(logs[0].contains("asking again with `json_object`"));
    assert!(logs[1].contains("asking again"));
    assert!(logs[2].contains("keeping the first 3"));
}

#[test]
fn object_generator_fails_after_two_bad_answers_and_on_server_errors() {
    let server = FakeChatServer::start(2, |_| (200, chat_answer("I cannot do that")));
    let mut config = ChatConfig::new(server.url.clone(), "m");
    config.response_format = ResponseFormat::JsonObject;
    let runner = runner_with(Arc::new(FakeBackend::default()), Some(config));
    let run = run_ok(
        &runner,
        "[{ id: 'p', type: 'ObjectGenerator', parameters: { description: 'x', schema: { type: 'object' } } }]",
        json!({}),
    );
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.steps[0].error.as_ref().unwrap().message,
        "the model's answer was unusable twice: it is not JSON: I cannot do that"
    );

    let server = FakeChatServer::start(1, |_| (500, json!({ "error": "overloaded" })));
    let runner = runner_with(
        Arc::new(FakeBackend::default()),
        Some(ChatConfig::new(server.url.clone(), "m")),
    );
    let run = run_ok(
        &runner,
        "[{ id: 'p', type: 'ObjectGenerator', parameters: { description: 'x', schema: { type: 'object' } } }]",
        json!({}),
    );
    let message = &run.steps[0].error.as_ref().unwrap().message;
    assert!(message.contains("answered HTTP 500"), "{message}");
    assert!(message.contains("overloaded"), "{message}");
}

#[test]
fn object_generator_unreachable_server() {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let runner = runner_with(
        Arc::new(FakeBackend::default()),
        Some(ChatConfig::new(format!("http://127.0.0.1:{port}/v1"), "m")),
    );
    let run = run_ok(
        &runner,
        "[{ id: 'p', type: 'ObjectGenerator', parameters: { description: 'x', schema: { type: 'object' } } }]",
        json!({}),
    );
    let message = &run.steps[0].error.as_ref().unwrap().message;
    assert!(
        message.starts_with("could not reach the chat-completions server at"),
        "{message}"
    );
}

// ---------------------------------------------------- cancel, events, resume

/// Cancels the run's token while it runs, then succeeds.
struct CancelsRun;

impl Step for CancelsRun {
    fn run(&self, _parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        ctx.cancel_token().cancel();
        Ok(json!("done").into())
    }
}

/// Returns canceled when the token is set.
struct Waits;

impl Step for Waits {
    fn run(&self, _parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        ctx.cancel_token().cancel();
        if ctx.is_canceled() {
            return Err(StepError::canceled());
        }
        Ok(Value::Null.into())
    }
}

#[test]
fn cancel_between_steps_and_inside_a_step() {
    let mut registry = StepRegistry::with_basic_steps();
    registry
        .register("CancelsRun", CancelsRun)
        .register("Waits", Waits);
    let runner = FlowRunner::new(registry);

    let flow = runner
        .load("[{ id: 'a', type: 'CancelsRun' }, { id: 'b', type: 'Constant', parameters: { value: 1 } }, { id: 'c', type: 'Constant', parameters: { value: 2 } }]")
        .unwrap();
    let run = runner
        .run(&flow, json!({}), &RunOptions::default())
        .unwrap();
    assert_eq!(run.status, RunStatus::Canceled);
    let statuses: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Canceled,
            StepStatus::Canceled
        ]
    );
    assert_eq!(run.error.as_ref().unwrap().step_id.as_deref(), Some("b"));

    let flow = runner
        .load(
            "[{ id: 'a', type: 'Waits' }, { id: 'b', type: 'Constant', parameters: { value: 1 } }]",
        )
        .unwrap();
    let run = runner
        .run(&flow, json!({}), &RunOptions::default())
        .unwrap();
    assert_eq!(run.status, RunStatus::Canceled);
    assert_eq!(run.steps[0].status, StepStatus::Canceled);
    assert_eq!(run.steps[1].status, StepStatus::Canceled);
}

#[test]
fn events_describe_the_run() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend, None);
    let flow = runner
        .load("[{ id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [{ prompt: 'a' }, { prompt: 'b' }] } }, { id: 't', type: 'Template', parameters: { template: '{{ $.results.gen[1].id }}' } }]")
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = RunOptions {
        run_id: Some("run-1".into()),
        flow_id: Some("flow-1".into()),
        events: Some(Arc::new(move |e: &FlowEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..RunOptions::default()
    };
    let run = runner.run(&flow, json!({}), &options).unwrap();
    assert_eq!(run.id, "run-1");
    assert_eq!(run.flow_id.as_deref(), Some("flow-1"));
    let events = events.lock().unwrap().clone();
    let names: Vec<&str> = events.iter().map(FlowEvent::name).collect();
    assert_eq!(
        names,
        [
            "run_started",
            "step_started",
            "step_progress",
            "step_progress",
            "step_finished",
            "step_started",
            "step_finished",
            "run_finished"
        ]
    );
    let finished = serde_json::to_value(&events[6]).unwrap();
    assert_eq!(finished["type"], "step_finished");
    assert_eq!(finished["stepId"], "t");
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(finished["result"], "job-1-asset-1");
    let progress = serde_json::to_value(&events[3]).unwrap();
    assert_eq!(
        progress,
        json!({ "type": "step_progress", "runId": "run-1", "stepId": "gen", "done": 2, "total": 2, "message": "images" })
    );
}

#[test]
fn a_stored_run_resumes_after_its_finished_steps() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend.clone(), None);
    let flow = runner
        .load("[{ id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [{ prompt: 'a' }] } }, { id: 't', type: 'Template', parameters: { template: '$.results.gen[0].file_url' } }]")
        .unwrap();
    let mut run = runner
        .prepare(&flow, json!({}), &RunOptions::default())
        .unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    // As if the process stopped after the first step: the record was stored
    // with `gen` finished and `t` running.
    run.status = RunStatus::Running;
    run.steps[0].status = StepStatus::Succeeded;
    run.steps[0].result = Some(json!([{ "file_url": "file:///stored.webp" }]));
    run.steps[1].status = StepStatus::Running;
    let stored: FlowRun = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
    let mut resumed = stored;
    runner.execute(&flow, &mut resumed, &RunOptions::default());
    assert_eq!(resumed.status, RunStatus::Succeeded);
    assert_eq!(resumed.results()["t"], "file:///stored.webp");
    assert!(
        backend.requests().is_empty(),
        "finished steps do not run again"
    );
}

/// The checkpoint receives the record at each durable change; the one taken
/// after the first step finished resumes without running that step again.
#[test]
fn checkpoints_record_each_step_and_resume() {
    let backend = Arc::new(FakeBackend::default());
    let runner = runner_with(backend.clone(), None);
    let flow = runner
        .load("[{ id: 'gen', type: 'ImageGenerator', parameters: { baseModel: 'm', images: [{ prompt: 'a' }] } }, { id: 't', type: 'Template', parameters: { template: '$.results.gen[0].file_url' } }]")
        .unwrap();
    let saved = Arc::new(Mutex::new(Vec::<FlowRun>::new()));
    let sink = saved.clone();
    let options = RunOptions {
        checkpoint: Some(Arc::new(move |r: &FlowRun| {
            sink.lock().unwrap().push(r.clone())
        })),
        ..RunOptions::default()
    };
    let run = runner.run(&flow, json!({}), &options).unwrap();
    let saved = saved.lock().unwrap().clone();
    // started, gen started, gen finished, t started, t finished, finished.
    assert_eq!(saved.len(), 6, "{saved:#?}");
    assert_eq!(saved.last(), Some(&run));
    assert_eq!(saved[1].steps[0].status, StepStatus::Running);
    let after_gen = saved[2].clone();
    assert_eq!(after_gen.steps[0].status, StepStatus::Succeeded);
    assert_eq!(after_gen.steps[1].status, StepStatus::Pending);
    assert_eq!(backend.requests().len(), 1);
    let mut resumed = after_gen;
    runner.execute(&flow, &mut resumed, &RunOptions::default());
    assert_eq!(resumed.status, RunStatus::Succeeded);
    assert_eq!(resumed.results()["t"], run.results()["t"]);
    assert_eq!(backend.requests().len(), 1, "gen did not run again");
}
