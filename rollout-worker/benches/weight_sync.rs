//! Weight sync over loopback gRPC, beside plain TCP on the same loopback in the same run.
//!
//! A learner (Chorus' learner service on a model with random weights) publishes its version; a
//! client fetches it the way a worker does, three ways, each timed `--repeats` times:
//!
//! - `stream`: `StreamWeights` read to its verified last chunk (1 MiB chunks, BLAKE3 over the
//!   stream as Chorus' learner seals it), the tensors assembled;
//! - `install`: the same, then an engine built from the tensors (`fetch_version`): the time from
//!   asking for a published version to being able to sample from it;
//! - `tcp`: the same number of bytes written through one loopback TCP connection in 1 MiB
//!   writes and read on the other side (the ceiling any protocol over that link has).
//!
//! It prints the CPU, each measurement's median seconds and GB/s (10^9 bytes), and the ratio of
//! `stream` to `tcp`.
//!
//!   cargo bench -p chorus-rollout-worker --bench weight_sync -- [MODEL.json] [--repeats N]
//!
//! MODEL.json defaults to `configs/models/small-d512.json` (about 44M parameters, 176 MB in f32).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use chorus_learner::{LearnerConfig, LearnerService, LearnerServiceConfig, Trainer, spawn_learner};
use chorus_model::engine::EngineOptions;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::limits::LEARNER_MAX_MESSAGE_BYTES;
use chorus_proto::v1::StreamWeightsRequest;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::LearnerServer;
use chorus_rollout_worker::fetch_version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The chunk size Chorus' learner publishes with (`runtime::services`).
const CHUNK_BYTES: usize = 1 << 20;

fn main() {
    let mut model = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/models/small-d512.json"
    ));
    let mut repeats = 5usize;
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeats" => {
                repeats = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--repeats needs a number above 0")
            }
            // Cargo runs benches inside the package; a path given from the repository root
            // is found there too.
            other if !other.starts_with("--") => {
                let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
                model = [PathBuf::from(other), root.join(other)]
                    .into_iter()
                    .find(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from(other))
            }
            other => panic!("unknown option {other}; allowed: [MODEL.json] --repeats N"),
        }
    }
    println!("cpu: {}", cpu_model());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(model, repeats));
}

async fn run(model: PathBuf, repeats: usize) {
    let cfg =
        NemotronHConfig::from_file(&model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let params = checkpoint::init_params(&cfg, 7, &Device::Cpu).expect("random weights");
    let trainer = Trainer::new(cfg.clone(), params, LearnerConfig::default()).expect("trainer");
    let started = Instant::now();
    let handle = spawn_learner(
        trainer,
        LearnerServiceConfig {
            run_id: "bench".into(),
            groups_per_step: 1,
            max_chunk_bytes: CHUNK_BYTES,
            keep_versions: 1,
            checkpoints: None,
        },
    );
    let published = started.elapsed();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let service = LearnerServer::new(LearnerService::new(handle))
        .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(LEARNER_MAX_MESSAGE_BYTES);
    tokio::spawn(
        chorus_proto::tls::server()
            .expect("a server builder")
            .add_service(tonic::service::interceptor::InterceptedService::new(
                service,
                RequireToken::new("t").expect("token"),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The endpoint and server every Chorus process builds (their HTTP/2 windows and frame size).
    let channel = chorus_proto::tls::endpoint(&url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client =
        LearnerClient::with_interceptor(channel, AttachToken::new("t").expect("token"))
            .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES);

    let mut stream_times = vec![];
    let mut bytes = 0u64;
    for _ in 0..repeats {
        let t = Instant::now();
        let mut stream = client
            .stream_weights(StreamWeightsRequest {
                run_id: "bench".into(),
                policy_version: 0,
                requester_id: "bench".into(),
                start_chunk: 0,
                exact: false,
            })
            .await
            .expect("StreamWeights")
            .into_inner();
        let (_, tensors) = chorus_proto::weights::receive(&mut stream)
            .await
            .expect("a whole, verified version");
        stream_times.push(t.elapsed());
        bytes = tensors.values().map(|t| t.data.len() as u64 * 4).sum();
    }
    let mut install_times = vec![];
    for _ in 0..repeats {
        let t = Instant::now();
        fetch_version(
            &mut client,
            &cfg,
            &EngineOptions::default(),
            "bench",
            "bench",
            0,
        )
        .await
        .expect("a version to sample from");
        install_times.push(t.elapsed());
    }
    let mut tcp_times = vec![];
    for _ in 0..repeats {
        tcp_times.push(plain_tcp(bytes).await);
    }

    println!(
        "model: {} ({:.1} M parameters, {:.0} MB in f32); learner published its first version in {:.2} s",
        model.display(),
        bytes as f64 / 4e6,
        bytes as f64 / 1e6,
        published.as_secs_f64()
    );
    println!("{:<10} {:>10} {:>10}", "", "median s", "GB/s");
    let rows = [
        ("tcp", median(&mut tcp_times)),
        ("stream", median(&mut stream_times)),
        ("install", median(&mut install_times)),
    ];
    for (name, secs) in rows {
        println!(
            "{name:<10} {secs:>10.3} {:>10.2}",
            bytes as f64 / secs / 1e9
        );
    }
    println!(
        "stream / tcp throughput: {:.2}x ({repeats} repeats each, medians)",
        rows[0].1 / rows[1].1
    );
}

/// The time to move `bytes` through one loopback TCP connection in chunk-sized writes.
async fn plain_tcp(bytes: u64) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut read = 0u64;
        while read < bytes {
            let n = socket.read(&mut buffer).await.expect("read");
            assert!(n > 0, "the writer closed early");
            read += n as u64;
        }
    });
    let t = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let chunk = vec![7u8; CHUNK_BYTES];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK_BYTES as u64) as usize;
        socket.write_all(&chunk[..n]).await.expect("write");
        sent += n as u64;
    }
    reader.await.expect("reader");
    t.elapsed()
}

fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64()
}

/// The CPU's model name and the vector extensions that matter here.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has: Vec<&str> = ["avx2", "avx512f", "sha_ni", "amx_tile"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!(
        "{} ({} threads; {})",
        field("model name"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        has.join(", ")
    )
}
