//! Test doubles: an image backend that records its requests, a stand-in
//! `RegisterTraining` step, and a chat-completions server on 127.0.0.1.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use easel_flow::{
    AssetRecord, ImageBackend, ImageJobResult, Step, StepContext, StepError, StepOutput,
};
use serde_json::{json, Map, Value};

/// Records every request and answers one asset per image (× `batchSize`).
#[derive(Default)]
pub struct FakeBackend {
    pub requests: Mutex<Vec<Value>>,
    /// When set, every request fails with this message.
    pub fail_with: Option<String>,
}

impl FakeBackend {
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

impl ImageBackend for FakeBackend {
    fn generate(&self, request: Value, ctx: &StepContext<'_>) -> Result<ImageJobResult, StepError> {
        let job = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(request.clone());
            format!("job-{}", requests.len())
        };
        if let Some(message) = &self.fail_with {
            return Err(StepError::failed(message.clone()));
        }
        let images = request["images"].as_array().cloned().unwrap_or_default();
        let total: u64 = images
            .iter()
            .map(|i| i["batchSize"].as_u64().unwrap_or(1))
            .sum();
        let mut assets = Vec::new();
        for (i, image) in images.iter().enumerate() {
            for b in 0..image["batchSize"].as_u64().unwrap_or(1) {
                let n = assets.len();
                let name = format!("{job}-{i}-{b}.webp");
                let mut extra = Map::new();
                extra.insert("prompt".into(), image["prompt"].clone());
                assets.push(AssetRecord {
                    id: format!("{job}-asset-{n}"),
                    file_url: format!("file:///data/assets/{name}"),
                    file_name: name,
                    file_size: 1000 + n as u64,
                    file_type: "image/webp".into(),
                    extra,
                });
                ctx.progress(assets.len() as u64, total, Some("images"));
            }
        }
        Ok(ImageJobResult {
            job_id: job,
            assets,
        })
    }
}

/// The server's `RegisterTraining` step, stood in: records its parameters
/// and returns `{ id }`.
#[derive(Default, Clone)]
pub struct FakeRegisterTraining {
    pub calls: Arc<Mutex<Vec<Value>>>,
}

pub const TRAINING_ID: &str = "0b5c2f9e-6a47-4d3e-9a51-2f1e7c3d8b90";

impl Step for FakeRegisterTraining {
    fn run(&self, parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        self.calls.lock().unwrap().push(parameters);
        Ok(json!({ "id": TRAINING_ID, "status": "ready" }).into())
    }
}

/// A request the fake chat server received.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

type Responder = dyn Fn(&ChatRequest) -> (u16, Value) + Send + Sync;

/// A chat-completions server on 127.0.0.1 that answers at most
/// `max_requests` requests, then stops.
pub struct FakeChatServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<ChatRequest>>>,
    handle: Option<JoinHandle<()>>,
}

impl FakeChatServer {
    pub fn start(
        max_requests: usize,
        responder: impl Fn(&ChatRequest) -> (u16, Value) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let responder: Arc<Responder> = Arc::new(responder);
        let handle = std::thread::spawn(move || {
            for _ in 0..max_requests {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let _ = serve(stream, &recorded, responder.as_ref());
            }
        });
        Self {
            url,
            requests,
            handle: Some(handle),
        }
    }

    pub fn requests(&self) -> Vec<ChatRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeChatServer {
    fn drop(&mut self) {
        // The thread ends after its requests; don't wait on one that never came.
        drop(self.handle.take());
    }
}

fn serve(
    stream: TcpStream,
    recorded: &Mutex<Vec<ChatRequest>>,
    responder: &Responder,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let request = ChatRequest {
        path,
        authorization,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    recorded.lock().unwrap().push(request.clone());
    let (status, answer) = responder(&request);
    let text = answer.to_string();
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

/// A chat-completions answer whose message content is `content`.
pub fn chat_answer(content: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [{ "index": 0, "finish_reason": "stop",
                      "message": { "role": "assistant", "content": content } }]
    })
}

/// The user message of a chat request.
pub fn user_message(request: &ChatRequest) -> String {
    request.body["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}
