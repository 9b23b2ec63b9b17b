//! `ObjectGenerator`: fills a JSON Schema from a description and an input
//! through an OpenAI-compatible chat-completions server.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{expect_string, finish, object, unknown_parameters};
use crate::error::{ParamError, ParamPath};
use crate::path::type_name;
use crate::schema;
use crate::step::{is_dynamic, Step, StepContext, StepError, StepOutput};

/// How answers are constrained to JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResponseFormat {
    /// `response_format: { type: "json_schema", json_schema: { schema } }`
    /// (OpenAI structured outputs; llama.cpp, vLLM and Ollama's OpenAI
    /// endpoint turn it into a grammar). A server that rejects it (HTTP 400
    /// or 422) is asked again once with `json_object`. The default.
    #[default]
    JsonSchema,
    /// `response_format: { type: "json_object" }`: JSON, shaped by the prompt only.
    JsonObject,
}

/// Where `ObjectGenerator` sends its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatConfig {
    /// The server's base URL (`http://127.0.0.1:8080/v1`; `/chat/completions`
    /// is appended) or the full endpoint URL ending in `/chat/completions`.
    pub url: String,
    /// The model name sent with each request (a step's `model` parameter overrides it).
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// The limit on one request, connection included [default: 120 s].
    pub timeout: Duration,
    /// How answers are constrained to JSON.
    pub response_format: ResponseFormat,
}

impl ChatConfig {
    /// A configuration for `url` and `model`, with the defaults.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(120),
            response_format: ResponseFormat::JsonSchema,
        }
    }

    /// The configuration from the environment: `EASEL_LLM_URL`,
    /// `EASEL_LLM_MODEL`, and optionally `EASEL_LLM_API_KEY`,
    /// `EASEL_LLM_TIMEOUT_SECS`, `EASEL_LLM_RESPONSE_FORMAT`
    /// (`json_schema` or `json_object`). `Ok(None)` when `EASEL_LLM_URL` is unset.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`Self::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let Some(url) = lookup("EASEL_LLM_URL") else {
            return Ok(None);
        };
        let model = lookup("EASEL_LLM_MODEL").ok_or_else(|| {
            "EASEL_LLM_URL is set but EASEL_LLM_MODEL is not: set it to the model name the \
             chat-completions server expects"
                .to_string()
        })?;
        let mut config = Self::new(url, model);
        config.api_key = lookup("EASEL_LLM_API_KEY");
        if let Some(secs) = lookup("EASEL_LLM_TIMEOUT_SECS") {
            let secs: u64 = secs.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                format!("EASEL_LLM_TIMEOUT_SECS: `{secs}` is not a number of seconds")
            })?;
            config.timeout = Duration::from_secs(secs);
        }
        if let Some(format) = lookup("EASEL_LLM_RESPONSE_FORMAT") {
            config.response_format = match format.as_str() {
                "json_schema" => ResponseFormat::JsonSchema,
                "json_object" => ResponseFormat::JsonObject,
                other => {
                    return Err(format!(
                        "EASEL_LLM_RESPONSE_FORMAT: `{other}` is neither `json_schema` nor `json_object`"
                    ))
                }
            };
        }
        Ok(Some(config))
    }

    /// The chat-completions endpoint.
    pub fn endpoint(&self) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/chat/completions") {
            url.to_string()
        } else {
            format!("{url}/chat/completions")
        }
    }
}

const NOT_CONFIGURED: &str = "ObjectGenerator needs an OpenAI-compatible chat-completions server, \
    and none is configured: set EASEL_LLM_URL (for example http://127.0.0.1:8080/v1) and \
    EASEL_LLM_MODEL, or give the runner a ChatConfig";

/// The largest `amount` accepted.
pub const MAX_AMOUNT: u64 = 1000;

/// `ObjectGenerator`: asks a chat model for a value matching `schema`.
///
/// Parameters: `description` (the instructions, required), `schema` (a JSON
/// Schema, required), `input` (any value: strings are sent as they are,
/// other values as JSON), `amount` (how many items, see below), `model`
/// (overrides the configured model), `temperature`.
///
/// The result is the value matching `schema`: for the seed's
/// `{ type: 'object', properties: { prompts: { type: 'array', ... } } }`,
/// an object whose `prompts` later steps read as
/// `$.results.<id>.prompts`. `amount` counts the items of the arrays to
/// fill: of the answer itself when the schema's type is `array`, else of
/// each array property at the top of an `object` schema (with neither,
/// `amount` above 1 is an error). It is asked for in the instructions and in
/// the schema sent (`minItems`/`maxItems`); longer arrays are cut to
/// `amount`, shorter ones are kept and noted in a `step_log` event.
///
/// Answers are checked against `schema` (see [`crate::schema`] for the
/// keywords checked); an answer that is not JSON or does not match is sent
/// back once with the problems, and a second bad answer fails the step.
#[derive(Debug, Clone, Default)]
pub struct ObjectGenerator {
    chat: Option<ChatConfig>,
}

impl ObjectGenerator {
    /// An `ObjectGenerator` on `chat`; with `None`, runs fail with a message
    /// saying how to configure one.
    pub fn new(chat: Option<ChatConfig>) -> Self {
        Self { chat }
    }
}

const PARAMETERS: [&str; 6] = [
    "description",
    "schema",
    "input",
    "amount",
    "model",
    "temperature",
];

/// The array properties at the top of an object schema, or `None` for an array schema.
fn array_targets(schema: &Value) -> Option<Vec<String>> {
    match schema.get("type").and_then(Value::as_str) {
        Some("array") => None,
        _ => Some(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| {
                    props
                        .iter()
                        .filter(|(_, s)| s.get("type").and_then(Value::as_str) == Some("array"))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default(),
        ),
    }
}

fn amount_error(schema: &Value) -> Option<String> {
    match array_targets(schema) {
        Some(targets) if targets.is_empty() => Some(
            "`amount` counts array items, but `schema` has no array to fill (make the schema an \
             `array`, or give it an array property)"
                .to_string(),
        ),
        _ => None,
    }
}

fn parse_amount(value: Option<&Value>) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(n) if (1..=MAX_AMOUNT).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "must be a whole number from 1 to {MAX_AMOUNT}, not {}",
                if v.is_number() {
                    v.to_string()
                } else {
                    type_name(v).to_string()
                }
            )),
        },
    }
}

impl Step for ObjectGenerator {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let map = object(parameters).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        unknown_parameters(map, &PARAMETERS, "ObjectGenerator", &mut errors);
        expect_string(map, "description", &mut errors);
        expect_string(map, "model", &mut errors);
        if !map.contains_key("description") {
            errors.push(ParamError::new(
                ParamPath::root().key("description"),
                "missing: tell the model what to generate",
            ));
        }
        let schema_path = ParamPath::root().key("schema");
        let literal_schema = match map.get("schema") {
            None => {
                errors.push(ParamError::new(
                    schema_path,
                    "missing: the JSON Schema of the value to generate",
                ));
                None
            }
            Some(v) if is_dynamic(v) => None,
            Some(v) => {
                for problem in schema::check_schema(v) {
                    if let Some((path, message)) = problem.split_once(": ") {
                        errors.push(ParamError::new(
                            ParamPath::field(&format!("parameters.{path}")),
                            message,
                        ));
                    }
                }
                Some(v)
            }
        };
        let amount_path = ParamPath::root().key("amount");
        match map.get("amount") {
            Some(v) if is_dynamic(v) => {}
            amount => match parse_amount(amount) {
                Err(message) => errors.push(ParamError::new(amount_path, message)),
                Ok(Some(n)) if n > 1 => {
                    if let Some(message) = literal_schema.and_then(amount_error) {
                        errors.push(ParamError::new(amount_path, message));
                    }
                }
                Ok(_) => {}
            },
        }
        if let Some(t) = map.get("temperature") {
            if !is_dynamic(t) && !t.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t)) {
                errors.push(ParamError::new(
                    ParamPath::root().key("temperature"),
                    format!("must be a number from 0 to 2, not {t}"),
                ));
            }
        }
        finish(errors)
    }

    fn preflight(&self, _parameters: &Value) -> Result<(), String> {
        match self.chat {
            Some(_) => Ok(()),
            None => Err(NOT_CONFIGURED.to_string()),
        }
    }

    fn run(&self, parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let Some(chat) = &self.chat else {
            return Err(StepError::failed(NOT_CONFIGURED));
        };
        let request = Request::from_parameters(&parameters, chat)?;
        request.generate(chat, ctx).map(StepOutput::from)
    }
}

/// One ObjectGenerator request, parameters resolved.
struct Request {
    description: String,
    schema: Value,
    input: Option<Value>,
    amount: Option<u64>,
    model: String,
    temperature: Option<f64>,
}

fn failed_at(key: &str, message: impl std::fmt::Display) -> StepError {
    StepError::failed(format!("{}: {message}", ParamPath::root().key(key)))
}

impl Request {
    fn from_parameters(parameters: &Value, chat: &ChatConfig) -> Result<Self, StepError> {
        let map: &Map<String, Value> =
            object(parameters).map_err(|e| StepError::failed(e.to_string()))?;
        let description = match map.get("description") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(failed_at(
                    "description",
                    format!("must be a string, not {}", type_name(other)),
                ))
            }
            None => return Err(failed_at("description", "missing")),
        };
        let schema = map.get("schema").cloned().unwrap_or(Value::Null);
        if let Some(problem) = schema::check_schema(&schema).into_iter().next() {
            return Err(StepError::failed(format!("parameters.{problem}")));
        }
        let amount = parse_amount(map.get("amount")).map_err(|m| failed_at("amount", m))?;
        if amount.is_some_and(|n| n > 1) {
            if let Some(message) = amount_error(&schema) {
                return Err(failed_at("amount", message));
            }
        }
        let model = match map.get("model") {
            None | Some(Value::Null) => chat.model.clone(),
            Some(Value::String(m)) => m.clone(),
            Some(other) => {
                return Err(failed_at(
                    "model",
                    format!("must be a string, not {}", type_name(other)),
                ))
            }
        };
        let temperature =
            match map.get("temperature") {
                None | Some(Value::Null) => None,
                Some(t) => Some(t.as_f64().filter(|t| (0.0..=2.0).contains(t)).ok_or_else(
                    || {
                        failed_at(
                            "temperature",
                            format!("must be a number from 0 to 2, not {t}"),
                        )
                    },
                )?),
            };
        Ok(Self {
            description,
            schema,
            input: map.get("input").cloned(),
            amount,
            model,
            temperature,
        })
    }

    /// The schema sent: objects as they are, other roots wrapped in
    /// `{ result: ... }` (structured outputs want an object at the root);
    /// with `amount`, arrays get `minItems`/`maxItems`.
    fn wire_schema(&self) -> Value {
        let mut schema = self.schema.clone();
        if let Some(n) = self.amount {
            let pin = |s: &mut Value| {
                if let Value::Object(m) = s {
                    m.entry("minItems").or_insert(json!(n));
                    m.entry("maxItems").or_insert(json!(n));
                }
            };
            match array_targets(&self.schema) {
                None => pin(&mut schema),
                Some(targets) => {
                    for key in targets {
                        if let Some(s) =
                            schema.pointer_mut(&format!("/properties/{}", escape_pointer(&key)))
                        {
                            pin(s);
                        }
                    }
                }
            }
        }
        if self.wrapped() {
            json!({
                "type": "object",
                "properties": { "result": schema },
                "required": ["result"],
                "additionalProperties": false
            })
        } else {
            schema
        }
    }

    fn wrapped(&self) -> bool {
        self.schema.get("type").and_then(Value::as_str) != Some("object")
    }

    fn system_prompt(&self) -> String {
        let mut prompt = format!(
            "{}\n\nAnswer with one JSON value and nothing else. It must match this JSON Schema:\n{}",
            self.description.trim(),
            self.wire_schema()
        );
        if let Some(n) = self.amount {
            match array_targets(&self.schema) {
                None => prompt.push_str(&format!(
                    "\nThe `result` array must contain exactly {n} items."
                )),
                Some(targets) => {
                    let names: Vec<String> = targets.iter().map(|t| format!("`{t}`")).collect();
                    prompt.push_str(&format!(
                        "\nThe {} {} must contain exactly {n} items.",
                        if names.len() == 1 { "array" } else { "arrays" },
                        names.join(" and ")
                    ));
                }
            }
        }
        prompt
    }

    fn user_prompt(&self) -> String {
        match &self.input {
            None | Some(Value::Null) => "Generate the value.".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => serde_json::to_string_pretty(other).unwrap_or_default(),
        }
    }

    fn generate(&self, chat: &ChatConfig, ctx: &StepContext<'_>) -> Result<Value, StepError> {
        let mut messages = vec![
            json!({ "role": "system", "content": self.system_prompt() }),
            json!({ "role": "user", "content": self.user_prompt() }),
        ];
        let mut format = chat.response_format;
        let mut attempts = 0;
        loop {
            if ctx.is_canceled() {
                return Err(StepError::canceled());
            }
            attempts += 1;
            let content = match self.call(chat, &messages, format) {
                Ok(content) => content,
                Err(CallError::Rejected(detail)) if format == ResponseFormat::JsonSchema => {
                    ctx.log(format!(
                        "the chat-completions server rejected `json_schema` response_format ({detail}); asking again with `json_object`"
                    ));
                    format = ResponseFormat::JsonObject;
                    attempts -= 1;
                    continue;
                }
                Err(e) => return Err(StepError::failed(e.message(chat))),
            };
            match self.check(&content) {
                Ok(value) => return Ok(self.fit_amount(value, ctx)),
                Err(problem) if attempts < 2 => {
                    ctx.log(format!(
                        "the model's answer was unusable ({problem}); asking again"
                    ));
                    messages.push(json!({ "role": "assistant", "content": content }));
                    messages.push(json!({
                        "role": "user",
                        "content": format!("That answer is unusable: {problem}. Answer again with only the JSON value matching the schema.")
                    }));
                }
                Err(problem) => {
                    return Err(StepError::failed(format!(
                        "the model's answer was unusable twice: {problem}"
                    )))
                }
            }
        }
    }

    fn call(
        &self,
        chat: &ChatConfig,
        messages: &[Value],
        format: ResponseFormat,
    ) -> Result<String, CallError> {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "response_format": match format {
                ResponseFormat::JsonSchema => json!({
                    "type": "json_schema",
                    "json_schema": { "name": "result", "schema": self.wire_schema(), "strict": false }
                }),
                ResponseFormat::JsonObject => json!({ "type": "json_object" }),
            },
        });
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(chat.timeout.min(Duration::from_secs(10)))
            .timeout(chat.timeout)
            .build();
        let mut request = agent.post(&chat.endpoint());
        if let Some(key) = &chat.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let response = match request.send_json(body) {
            Ok(response) => response,
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                let detail = format!("HTTP {code}: {}", excerpt(&text));
                return Err(if matches!(code, 400 | 422) {
                    CallError::Rejected(detail)
                } else {
                    CallError::Status(detail)
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(CallError::Transport(t.to_string())),
        };
        let answer: Value = response
            .into_json()
            .map_err(|e| CallError::Protocol(format!("the answer is not JSON: {e}")))?;
        let message = answer.pointer("/choices/0/message");
        match message
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
        {
            Some(content) => Ok(content.to_string()),
            None => match message
                .and_then(|m| m.get("refusal"))
                .and_then(Value::as_str)
            {
                Some(refusal) => Err(CallError::Protocol(format!("the model refused: {refusal}"))),
                None => Err(CallError::Protocol(format!(
                    "the answer has no `choices[0].message.content`: {}",
                    excerpt(&answer.to_string())
                ))),
            },
        }
    }

    /// Parses and checks an answer; the value (unwrapped) or what is wrong.
    fn check(&self, content: &str) -> Result<Value, String> {
        let mut value =
            parse_answer(content).ok_or_else(|| format!("it is not JSON: {}", excerpt(content)))?;
        if self.wrapped() {
            value = match value {
                Value::Object(mut m) if m.contains_key("result") => {
                    m.remove("result").unwrap_or(Value::Null)
                }
                // A model may answer the bare value, ignoring the wrapper.
                other => other,
            };
        }
        let problems = schema::validate(&self.schema, &value);
        if problems.is_empty() {
            Ok(value)
        } else {
            Err(format!(
                "it does not match the schema: {}",
                problems.join("; ")
            ))
        }
    }

    /// Cuts arrays longer than `amount`; notes shorter ones.
    fn fit_amount(&self, mut value: Value, ctx: &StepContext<'_>) -> Value {
        let Some(n) = self.amount else {
            return value;
        };
        let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
        let fit = |name: &str, array: &mut Value| {
            if let Value::Array(items) = array {
                if items.len() > n_usize {
                    ctx.log(format!(
                        "{name}: the model gave {} items, keeping the first {n}",
                        items.len()
                    ));
                    items.truncate(n_usize);
                } else if items.len() < n_usize {
                    ctx.log(format!(
                        "{name}: asked for {n} items, the model gave {}",
                        items.len()
                    ));
                }
            }
        };
        match array_targets(&self.schema) {
            None => fit("the answer", &mut value),
            Some(targets) => {
                for key in targets {
                    if let Some(array) = value.get_mut(&key) {
                        fit(&format!("`{key}`"), array);
                    }
                }
            }
        }
        value
    }
}

enum CallError {
    /// HTTP 400 / 422: maybe the response format is not supported.
    Rejected(String),
    Status(String),
    Transport(String),
    Protocol(String),
}

impl CallError {
    fn message(&self, chat: &ChatConfig) -> String {
        let url = chat.endpoint();
        match self {
            Self::Rejected(d) | Self::Status(d) => {
                format!("the chat-completions server at {url} answered {d}")
            }
            Self::Transport(d) => format!(
                "could not reach the chat-completions server at {url}: {d} (is it running? check EASEL_LLM_URL)"
            ),
            Self::Protocol(d) => format!("the chat-completions server at {url}: {d}"),
        }
    }
}

/// JSON from a model's answer: as is, inside a ```json fence, or the span
/// from the first `{`/`[` to the last `}`/`]`.
fn parse_answer(content: &str) -> Option<Value> {
    let text = content.trim();
    if let Ok(v) = serde_json::from_str(text) {
        return Some(v);
    }
    let unfenced = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .and_then(|t| t.trim_end().strip_suffix("```"));
    if let Some(inner) = unfenced {
        if let Ok(v) = serde_json::from_str(inner.trim()) {
            return Some(v);
        }
    }
    let start = text.find(['{', '['])?;
    let end = text.rfind(['}', ']'])?;
    (end > start)
        .then(|| serde_json::from_str(&text[start..=end]).ok())
        .flatten()
}

fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 300 {
        format!("{}...", text.chars().take(300).collect::<String>())
    } else {
        text.to_string()
    }
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_parameters() -> Value {
        json!({
            "amount": 40,
            "input": "noir",
            "description": "Generate a list of prompts.",
            "schema": {"type": "object", "properties": {"prompts": {"type": "array", "items": {"type": "string"}}}}
        })
    }

    #[test]
    fn validates_the_seed_parameters() {
        assert!(ObjectGenerator::new(None)
            .validate(&seed_parameters())
            .is_ok());
        let mut p = seed_parameters();
        p["input"] = json!("$.input.promptType");
        p["amount"] = json!("$.input.count");
        assert!(ObjectGenerator::new(None).validate(&p).is_ok());
    }

    #[test]
    fn validation_errors() {
        let errors = ObjectGenerator::new(None)
            .validate(&json!({"amount": 0, "schema": {"type": "obj"}, "temprature": 1}))
            .unwrap_err();
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            lines.contains(
                &"parameters.description: missing: tell the model what to generate".to_string()
            ),
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l.starts_with("parameters.schema.type: \"obj\" is not a JSON Schema type")), "{lines:?}");
        assert!(
            lines.contains(
                &"parameters.amount: must be a whole number from 1 to 1000, not 0".to_string()
            ),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("parameters.temprature: unknown parameter")),
            "{lines:?}"
        );
        let errors = ObjectGenerator::new(None)
            .validate(&json!({"amount": 3, "description": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}))
            .unwrap_err();
        assert!(errors[0].message.contains("no array to fill"), "{errors:?}");
    }

    #[test]
    fn preflight_without_server() {
        let e = ObjectGenerator::new(None)
            .preflight(&seed_parameters())
            .unwrap_err();
        assert!(e.contains("EASEL_LLM_URL"), "{e}");
    }

    #[test]
    fn wire_schema_pins_counts_and_wraps_non_objects() {
        let chat = ChatConfig::new("http://127.0.0.1:1/v1", "m");
        let r = Request::from_parameters(&seed_parameters(), &chat).unwrap();
        assert_eq!(r.wire_schema()["properties"]["prompts"]["minItems"], 40);
        assert!(r
            .system_prompt()
            .contains("The array `prompts` must contain exactly 40 items."));
        let r = Request::from_parameters(
            &json!({"description": "d", "amount": 2, "schema": {"type": "array", "items": {"type": "string"}}}),
            &chat,
        )
        .unwrap();
        let wire = r.wire_schema();
        assert_eq!(wire["properties"]["result"]["maxItems"], 2);
        assert_eq!(
            r.check(r#"{"result": ["a", "b"]}"#).unwrap(),
            json!(["a", "b"])
        );
        assert_eq!(r.check(r#"["a", "b"]"#).unwrap(), json!(["a", "b"]));
        assert!(r
            .check(r#"{"result": [1]}"#)
            .unwrap_err()
            .contains("expected string"));
    }

    #[test]
    fn answers_in_fences_and_prose() {
        assert_eq!(
            parse_answer("```json\n{\"a\": 1}\n```"),
            Some(json!({"a": 1}))
        );
        assert_eq!(
            parse_answer("Here: {\"a\": [1]} done"),
            Some(json!({"a": [1]}))
        );
        assert_eq!(parse_answer("no json"), None);
    }

    #[test]
    fn config_from_lookup() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(ChatConfig::from_lookup(vars(&[])).unwrap(), None);
        assert!(
            ChatConfig::from_lookup(vars(&[("EASEL_LLM_URL", "http://x/v1")]))
                .unwrap_err()
                .contains("EASEL_LLM_MODEL")
        );
        let c = ChatConfig::from_lookup(vars(&[
            ("EASEL_LLM_URL", "http://x/v1/"),
            ("EASEL_LLM_MODEL", "m"),
            ("EASEL_LLM_TIMEOUT_SECS", "5"),
            ("EASEL_LLM_RESPONSE_FORMAT", "json_object"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint(), "http://x/v1/chat/completions");
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.response_format, ResponseFormat::JsonObject);
        assert_eq!(
            ChatConfig::new("http://x/v1/chat/completions", "m").endpoint(),
            "http://x/v1/chat/completions"
        );
    }
}
