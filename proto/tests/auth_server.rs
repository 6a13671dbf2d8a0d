//! A real tonic server on 127.0.0.1:0 guarded by `RequireToken`: calls carrying
//! the shared token succeed, calls without it (or with another) are rejected.

use std::net::SocketAddr;

use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::v1::environment_client::EnvironmentClient;
use chorus_proto::v1::environment_server::{Environment, EnvironmentServer};
use chorus_proto::v1::{
    DescribeRequest, DescribeResponse, SampleRequest, SampleResponse, ScoreRequest, ScoreResponse,
    Split, StepRequest, StepResponse, Task,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

const TOKEN: &str = "test-token-7f3a";

/// A trivial single-turn environment: the reward is 1 when the completion
/// repeats the prompt.
struct Echo;

#[tonic::async_trait]
impl Environment for Echo {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(DescribeResponse {
            name: "echo".into(),
            train_size: 1,
            ..Default::default()
        }))
    }

    async fn sample(
        &self,
        req: Request<SampleRequest>,
    ) -> Result<Response<SampleResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(SampleResponse {
            task: Some(Task {
                environment: "echo".into(),
                task_id: format!("task-{}", req.seed),
                split: req.split,
                prompt: format!("say {}", req.seed),
                ..Default::default()
            }),
        }))
    }

    async fn step(&self, _: Request<StepRequest>) -> Result<Response<StepResponse>, Status> {
        Err(Status::unimplemented("echo is single-turn"))
    }

    async fn reference(
        &self,
        _: Request<chorus_proto::v1::ReferenceRequest>,
    ) -> Result<Response<chorus_proto::v1::ReferenceResponse>, Status> {
        Err(Status::unimplemented("echo has no reference solutions"))
    }

    async fn wrong_completions(
        &self,
        _: Request<chorus_proto::v1::WrongCompletionsRequest>,
    ) -> Result<Response<chorus_proto::v1::WrongCompletionsResponse>, Status> {
        Err(Status::unimplemented("echo has no wrong completions"))
    }

    async fn start(
        &self,
        _: Request<chorus_proto::v1::StartRequest>,
    ) -> Result<Response<chorus_proto::v1::StartResponse>, Status> {
        Err(Status::unimplemented("echo is single-turn"))
    }

    async fn score(&self, req: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let req = req.into_inner();
        let prompt = req.task.map(|t| t.prompt).unwrap_or_default();
        let reward = if req.completion == prompt { 1.0 } else { 0.0 };
        Ok(Response::new(ScoreResponse {
            reward,
            reason: format!(
                "completion {} the prompt",
                if reward > 0.0 {
                    "repeats"
                } else {
                    "differs from"
                }
            ),
            ..Default::default()
        }))
    }
}

async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = EnvironmentServer::with_interceptor(Echo, RequireToken::new(TOKEN).unwrap());
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn call_with_the_token_succeeds() {
    let addr = start_server().await;
    let mut client =
        EnvironmentClient::with_interceptor(channel(addr).await, AttachToken::new(TOKEN).unwrap());

    let described = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.name, "echo");

    let task = client
        .sample(SampleRequest {
            run_id: "run-1".into(),
            prompt_id: "p-1".into(),
            seed: 42,
            split: Split::Train as i32,
            difficulty: None,
            level: None,
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.task_id, "task-42");
    assert_eq!(task.split(), Split::Train);

    let scored = client
        .score(ScoreRequest {
            run_id: "run-1".into(),
            prompt_id: "p-1".into(),
            trajectory_id: "t-1".into(),
            completion: task.prompt.clone(),
            task: Some(task),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.reward, 1.0);
}

#[tokio::test]
async fn call_without_the_token_is_unauthenticated() {
    let addr = start_server().await;
    let mut client = EnvironmentClient::new(channel(addr).await);
    let status = client.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn call_with_another_token_is_unauthenticated() {
    let addr = start_server().await;
    let mut client = EnvironmentClient::with_interceptor(
        channel(addr).await,
        AttachToken::new("not-the-token").unwrap(),
    );
    let status = client.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // the unimplemented handler is never reached: auth comes first
    let status = client.step(StepRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}
