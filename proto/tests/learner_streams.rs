//! The Learner's two streams over a real connection, behind the token guard:
//! weights stream as sealed chunks that the client verifies, and trajectory
//! groups stream in and are acknowledged once per id even when resent.

use std::collections::BTreeSet;
use std::pin::Pin;

use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::checksum::{ChecksumError, WeightVerifier, seal};
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::{Learner, LearnerServer};
use chorus_proto::v1::{
    Dtype, StreamWeightsRequest, SubmitTrajectoriesResponse, Trajectory, TrajectoryGroup,
    WeightChunk,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "learner-token";

/// Serves two tensors (one split over two chunks); can corrupt one byte in flight.
struct FakeLearner {
    corrupt: bool,
}

fn weights(version: u64) -> Vec<WeightChunk> {
    let tensor = |name: &str, shape: Vec<u64>, offset: u64, data: Vec<u8>| WeightChunk {
        run_id: "run-1".into(),
        tensor_name: name.into(),
        dtype: Dtype::Bf16 as i32,
        shape,
        offset,
        data: data.into(),
        ..Default::default()
    };
    let mut chunks = vec![
        tensor("embed.weight", vec![4, 4], 0, (0..16).collect()),
        tensor("embed.weight", vec![4, 4], 16, (16..32).collect()),
        tensor("norm.weight", vec![4], 0, vec![1; 8]),
    ];
    seal(&mut chunks, version);
    chunks
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for FakeLearner {
    async fn submit_trajectories(
        &self,
        request: Request<Streaming<TrajectoryGroup>>,
    ) -> Result<Response<SubmitTrajectoriesResponse>, Status> {
        let mut stream = request.into_inner();
        let mut seen = BTreeSet::new();
        let mut response = SubmitTrajectoriesResponse::default();
        while let Some(group) = stream.next().await {
            let group = group?;
            if seen.insert(group.group_id.clone()) {
                response.accepted_group_ids.push(group.group_id);
            }
        }
        Ok(Response::new(response))
    }

    type StreamWeightsStream = ChunkStream;
    type StreamStepsStream =
        Pin<Box<dyn Stream<Item = Result<chorus_proto::v1::StepReport, Status>> + Send>>;

    async fn status(
        &self,
        _: tonic::Request<chorus_proto::v1::LearnerStatusRequest>,
    ) -> Result<tonic::Response<chorus_proto::v1::LearnerStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("a stand-in without Status"))
    }

    async fn stream_steps(
        &self,
        _: Request<chorus_proto::v1::StreamStepsRequest>,
    ) -> Result<Response<Self::StreamStepsStream>, Status> {
        Err(Status::unimplemented("this test learner reports no steps"))
    }

    async fn stream_weights(
        &self,
        request: Request<StreamWeightsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let mut chunks = weights(req.policy_version);
        if self.corrupt {
            let mut flipped = chunks[1].data.to_vec();
            flipped[3] ^= 0x80;
            chunks[1].data = flipped.into();
        }
        let chunks: Vec<_> = chunks
            .into_iter()
            .skip(req.start_chunk as usize)
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

async fn client(
    corrupt: bool,
) -> LearnerClient<tonic::service::interceptor::InterceptedService<Channel, AttachToken>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service =
        LearnerServer::with_interceptor(FakeLearner { corrupt }, RequireToken::new(TOKEN).unwrap());
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    LearnerClient::with_interceptor(channel, AttachToken::new(TOKEN).unwrap())
}

async fn receive(corrupt: bool) -> (Vec<WeightChunk>, Result<(), ChecksumError>) {
    let mut client = client(corrupt).await;
    let mut stream = client
        .stream_weights(StreamWeightsRequest {
            run_id: "run-1".into(),
            policy_version: 12,
            requester_id: "worker-0".into(),
            start_chunk: 0,
            exact: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut verifier = WeightVerifier::new();
    let mut received = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Err(e) = verifier.push(&chunk) {
            return (received, Err(e));
        }
        received.push(chunk);
    }
    (received, verifier.finish())
}

#[tokio::test]
async fn streamed_weights_verify_against_their_checksum() {
    let (chunks, verdict) = receive(false).await;
    assert_eq!(verdict, Ok(()));
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c.policy_version == 12));
    let embed: Vec<u8> = chunks
        .iter()
        .filter(|c| c.tensor_name == "embed.weight")
        .flat_map(|c| c.data.clone())
        .collect();
    assert_eq!(embed, (0..32).collect::<Vec<u8>>());
}

#[tokio::test]
async fn a_byte_corrupted_in_flight_is_caught() {
    let (_, verdict) = receive(true).await;
    assert!(
        matches!(
            verdict,
            Err(ChecksumError::Mismatch {
                policy_version: 12,
                ..
            })
        ),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn resubmitted_groups_are_acknowledged_once() {
    let mut client = client(false).await;
    let group = |id: &str| TrajectoryGroup {
        run_id: "run-1".into(),
        group_id: id.into(),
        environment: "math".into(),
        trajectories: vec![Trajectory {
            trajectory_id: format!("{id}-t0"),
            completion_token_ids: vec![5, 6, 7],
            logprobs: vec![-0.5, -0.25, -1.0],
            policy_versions: vec![3, 3, 4],
            reward: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sent = vec![group("g1"), group("g2"), group("g1")];
    let ack = client
        .submit_trajectories(tokio_stream::iter(sent))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted_group_ids, ["g1", "g2"]);
    assert!(ack.rejected.is_empty());
}
