//! Runs started from a small helper process instead of the caller.
//!
//! Every run forks (the namespaces backend forks four times before the program executes), and
//! `fork` copies the page tables of the whole address space and stalls the parent's other
//! threads while it does. A training process holding a model, its optimizer and the workers'
//! caches maps gigabytes, so each fork there costs far more than in a small process: the
//! `sandbox_overhead` bench measured `python3 -c pass` at 347 ms (median) started from a
//! process holding 2 GiB and at 65 ms started from the spawner.
//!
//! A binary that calls [`serve_or_enable`] first thing in `main` gets a spawner: on the first
//! use of [`super::shared`] it starts its own executable again (`/proc/self/exe`, by
//! `posix_spawn`, which does not copy the address space) with [`SPAWNER_ENV`] set, and that
//! process, small and doing nothing else, runs every request of the shared sandbox on its own
//! sandbox, one thread per connection. Requests and outcomes cross a Unix socket in a
//! directory only this user can enter; the program itself is contained exactly as before (the
//! spawner runs the same [`super::runner`]). The spawner exits when its parent does (its
//! standard input, a pipe the parent holds, reaches end of file). If the spawner cannot start,
//! or dies, runs fall back to the caller's own process with a warning: slower, never lost.
//! The spawner starts in the cgroup the caller's own detection left it in, so both find the
//! same cgroup hierarchy (under v2, the caller's `chorus-supervisor` leaf).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Backend, Limits, Outcome, Sandbox, SandboxError, SandboxRequest, Termination};

/// Set (to the socket's path) in the environment of a spawner process.
pub const SPAWNER_ENV: &str = "CHORUS_SANDBOX_SPAWNER";

/// The largest frame either side accepts.
const MAX_FRAME: usize = 1 << 30;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main`, before any other thread exists. In a spawner process (started
/// by [`Spawner::start`], [`SPAWNER_ENV`] set) this serves requests until the parent exits and
/// never returns; otherwise it enables the spawner for [`super::shared`] and returns.
///
/// The two go together so that only an executable that can serve as a spawner ever starts
/// itself as one.
pub fn serve_or_enable() {
    if let Some(path) = std::env::var_os(SPAWNER_ENV) {
        // Not inherited by anything the spawner starts.
        // SAFETY: no other thread exists yet (the caller's contract).
        unsafe { std::env::remove_var(SPAWNER_ENV) };
        let code = match serve(Path::new(&path)) {
            Ok(()) => 0,
            Err(message) => {
                // The parent reads this line (the protocol's first), not a log.
                let _ = writeln!(std::io::stdout(), "error: {message}");
                1
            }
        };
        std::process::exit(code);
    }
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether [`serve_or_enable`] enabled a spawner in this process.
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The spawner's side: detect a sandbox, listen, print `ready`, serve.
fn serve(socket: &Path) -> Result<(), String> {
    let sandbox = Sandbox::detect().map_err(|err| err.to_string())?;
    let listener = UnixListener::bind(socket)
        .map_err(|err| format!("listening on {}: {err}", socket.display()))?;
    let sandbox: &'static Sandbox = Box::leak(Box::new(sandbox));
    // The parent holds the other end of standard input; end of file means it is gone.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")
        .and_then(|()| stdout.flush())
        .map_err(|err| format!("writing to the parent: {err}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || serve_connection(sandbox, stream));
    }
    Ok(())
}

fn serve_connection(sandbox: &Sandbox, mut stream: UnixStream) {
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        let reply = match decode_request(&frame) {
            Ok(request) => encode_result(&super::runner::run(sandbox, &request)),
            Err(message) => encode_result(&Err(SandboxError::InvalidRequest(format!(
                "the spawner could not read the request: {message}"
            )))),
        };
        if write_frame(&mut stream, &reply).is_err() {
            return;
        }
    }
}

/// The caller's handle on its spawner process.
#[derive(Debug)]
pub(crate) struct Spawner {
    socket: PathBuf,
    /// Idle connections, reused by later runs.
    idle: Mutex<Vec<UnixStream>>,
    /// The spawner, its standard input kept open: it exits when that closes.
    child: Child,
    /// Set once a failure has been logged, so a dead spawner warns once.
    warned: AtomicBool,
}

impl Spawner {
    /// Starts this executable as a spawner and waits for it to be ready.
    pub(crate) fn start() -> Result<Spawner, String> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "chorus-sandbox-spawner-{}-{nonce:x}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|err| format!("creating {}: {err}", dir.display()))?;
        let socket = dir.join("socket");
        let mut child = Command::new("/proc/self/exe")
            .arg0("chorus-sandbox-spawner")
            .env(SPAWNER_ENV, &socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("starting /proc/self/exe as a spawner: {err}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("no pipe from the spawner's stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(match read {
                Err(err) => format!("reading the spawner's first line: {err}"),
                Ok(0) => "the spawner exited before it was ready".to_string(),
                Ok(_) => format!("the spawner said {:?}", line.trim()),
            });
        }
        Ok(Spawner {
            socket,
            idle: Mutex::new(Vec::new()),
            child,
            warned: AtomicBool::new(false),
        })
    }

    /// The spawner's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `req` in the spawner; `None` when the spawner could not be reached (the caller
    /// then runs it itself).
    pub(crate) fn run(&self, req: &SandboxRequest) -> Option<Result<Outcome, SandboxError>> {
        let request = encode_request(req);
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        // A reused connection may have been closed by a spawner that has since died; a fresh
        // one says for certain.
        let attempts = reused
            .into_iter()
            .map(Ok)
            .chain(std::iter::once_with(|| UnixStream::connect(&self.socket)));
        let mut last_error = String::new();
        for stream in attempts {
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    last_error = format!("connecting to {}: {err}", self.socket.display());
                    continue;
                }
            };
            let reply = write_frame(&mut stream, &request)
                .and_then(|()| read_frame(&mut stream))
                .map_err(|err| err.to_string());
            match reply {
                Ok(Some(frame)) => match decode_result(&frame) {
                    Ok(result) => {
                        if let Ok(mut idle) = self.idle.lock() {
                            idle.push(stream);
                        }
                        return Some(result);
                    }
                    Err(message) => last_error = format!("an unreadable reply: {message}"),
                },
                Ok(None) => last_error = "the spawner closed the connection".to_string(),
                Err(err) => last_error = err,
            }
        }
        if !self.warned.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                spawner = self.pid(),
                error = %last_error,
                "the sandbox spawner process is unreachable; runs start from this process instead"
            );
        }
        None
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn read_frame(stream: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame)?;
    Ok(Some(frame))
}

fn write_frame(stream: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len())
        .ok()
        .filter(|&len| len as usize <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other(format!("a frame of {} bytes", frame.len())))?;
    stream.write_all(&len.to_le_bytes())?;
    stream.write_all(frame)?;
    stream.flush()
}

/// Little-endian, length-prefixed fields.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn duration(&mut self, v: Duration) {
        self.u64(u64::try_from(v.as_nanos()).unwrap_or(u64::MAX));
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "{n} bytes wanted, {} left in the frame",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let len = usize::try_from(self.u64()?).map_err(|_| "a length beyond usize")?;
        Ok(self.take(len)?.to_vec())
    }
    fn str(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|err| format!("a string that is not UTF-8: {err}"))
    }
    fn duration(&mut self) -> Result<Duration, String> {
        Ok(Duration::from_nanos(self.u64()?))
    }
    fn count(&mut self) -> Result<usize, String> {
        let n = self.u32()? as usize;
        // Every item takes at least 8 bytes; a larger count is a corrupt frame.
        if n > self.0.len() / 8 + 1 {
            return Err(format!("{n} items in {} bytes", self.0.len()));
        }
        Ok(n)
    }
    fn end(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes left over", self.0.len()))
        }
    }
}

fn encode_request(req: &SandboxRequest) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(req.argv.len() as u32);
    for arg in &req.argv {
        w.str(arg);
    }
    w.u32(req.files.len() as u32);
    for (path, contents) in &req.files {
        w.str(path);
        w.bytes(contents);
    }
    w.bytes(&req.stdin);
    let limits = &req.limits;
    w.duration(limits.cpu_time);
    w.duration(limits.wall_time);
    w.u64(limits.memory_bytes);
    w.u32(limits.max_processes);
    w.u64(limits.max_output_bytes as u64);
    w.0
}

fn decode_request(frame: &[u8]) -> Result<SandboxRequest, String> {
    let mut r = Reader(frame);
    let argv = (0..r.count()?)
        .map(|_| r.str())
        .collect::<Result<Vec<_>, _>>()?;
    let files = (0..r.count()?)
        .map(|_| Ok((r.str()?, r.bytes()?)))
        .collect::<Result<Vec<_>, String>>()?;
    let stdin = r.bytes()?;
    let limits = Limits {
        cpu_time: r.duration()?,
        wall_time: r.duration()?,
        memory_bytes: r.u64()?,
        max_processes: r.u32()?,
        max_output_bytes: usize::try_from(r.u64()?).map_err(|_| "an output limit beyond usize")?,
    };
    r.end()?;
    Ok(SandboxRequest {
        argv,
        files,
        stdin,
        limits,
    })
}

fn backend_code(backend: Backend) -> u8 {
    match backend {
        Backend::Bubblewrap => 0,
        Backend::Namespaces => 1,
    }
}

fn backend_of(code: u8) -> Result<Backend, String> {
    match code {
        0 => Ok(Backend::Bubblewrap),
        1 => Ok(Backend::Namespaces),
        other => Err(format!("backend code {other}")),
    }
}

fn encode_result(result: &Result<Outcome, SandboxError>) -> Vec<u8> {
    let mut w = Writer::default();
    match result {
        Ok(outcome) => {
            w.u8(0);
            let (tag, value) = match outcome.termination {
                Termination::Exited(code) => (0, code),
                Termination::Signaled(signal) => (1, signal),
                Termination::CpuTimeLimit => (2, 0),
                Termination::WallTimeLimit => (3, 0),
                Termination::MemoryLimit => (4, 0),
                Termination::OutputLimit => (5, 0),
            };
            w.u8(tag);
            w.i32(value);
            w.bytes(&outcome.stdout);
            w.bytes(&outcome.stderr);
            w.duration(outcome.wall);
            w.u8(backend_code(outcome.backend));
        }
        Err(err) => {
            w.u8(1);
            match err {
                SandboxError::Unavailable(message) => {
                    w.u8(0);
                    w.str(message);
                }
                SandboxError::BackendUnavailable { backend, reason } => {
                    w.u8(1);
                    w.u8(backend_code(*backend));
                    w.str(reason);
                }
                SandboxError::NoPython(message) => {
                    w.u8(2);
                    w.str(message);
                }
                SandboxError::InvalidRequest(message) => {
                    w.u8(3);
                    w.str(message);
                }
                SandboxError::Os { what, source } => {
                    w.u8(4);
                    w.str(what);
                    w.i32(source.raw_os_error().unwrap_or(-1));
                    w.str(&source.to_string());
                }
            }
        }
    }
    w.0
}

fn decode_result(frame: &[u8]) -> Result<Result<Outcome, SandboxError>, String> {
    let mut r = Reader(frame);
    let result = match r.u8()? {
        0 => {
            let (tag, value) = (r.u8()?, r.i32()?);
            let termination = match tag {
                0 => Termination::Exited(value),
                1 => Termination::Signaled(value),
                2 => Termination::CpuTimeLimit,
                3 => Termination::WallTimeLimit,
                4 => Termination::MemoryLimit,
                5 => Termination::OutputLimit,
                other => return Err(format!("termination code {other}")),
            };
            Ok(Outcome {
                termination,
                stdout: r.bytes()?,
                stderr: r.bytes()?,
                wall: r.duration()?,
                backend: backend_of(r.u8()?)?,
            })
        }
        1 => Err(match r.u8()? {
            0 => SandboxError::Unavailable(r.str()?),
            1 => SandboxError::BackendUnavailable {
                backend: backend_of(r.u8()?)?,
                reason: r.str()?,
            },
            2 => SandboxError::NoPython(r.str()?),
            3 => SandboxError::InvalidRequest(r.str()?),
            4 => {
                let what = r.str()?;
                let code = r.i32()?;
                let message = r.str()?;
                let source = if code >= 0 {
                    std::io::Error::from_raw_os_error(code)
                } else {
                    std::io::Error::other(message)
                };
                SandboxError::Os { what, source }
            }
            other => return Err(format!("error code {other}")),
        }),
        other => return Err(format!("result code {other}")),
    };
    r.end()?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cross_unchanged() {
        let request = SandboxRequest {
            argv: vec!["/usr/bin/python3".into(), "-c".into(), "print('é')".into()],
            files: vec![
                ("a/b.py".into(), b"x = 1\n".to_vec()),
                ("empty".into(), vec![]),
                ("bin".into(), (0..=255).collect()),
            ],
            stdin: b"nonce\n".to_vec(),
            limits: Limits {
                cpu_time: Duration::from_millis(1500),
                wall_time: Duration::from_secs(7),
                memory_bytes: 3 << 30,
                max_processes: 9,
                max_output_bytes: 12345,
            },
        };
        assert_eq!(decode_request(&encode_request(&request)).unwrap(), request);
        let empty = SandboxRequest::default();
        assert_eq!(decode_request(&encode_request(&empty)).unwrap(), empty);
    }

    #[test]
    fn outcomes_and_errors_cross_unchanged() {
        for termination in [
            Termination::Exited(0),
            Termination::Exited(-3),
            Termination::Signaled(9),
            Termination::CpuTimeLimit,
            Termination::WallTimeLimit,
            Termination::MemoryLimit,
            Termination::OutputLimit,
        ] {
            for backend in [Backend::Bubblewrap, Backend::Namespaces] {
                let outcome = Outcome {
                    termination,
                    stdout: b"42\n".to_vec(),
                    stderr: b"Traceback".to_vec(),
                    wall: Duration::from_micros(12_345),
                    backend,
                };
                let back = decode_result(&encode_result(&Ok(outcome.clone()))).unwrap();
                assert_eq!(back.unwrap(), outcome);
            }
        }
        let errors = [
            SandboxError::Unavailable("no backend".into()),
            SandboxError::BackendUnavailable {
                backend: Backend::Bubblewrap,
                reason: "`bwrap` is not on PATH".into(),
            },
            SandboxError::NoPython("none on PATH".into()),
            SandboxError::InvalidRequest("an empty argv".into()),
            SandboxError::Os {
                what: "fork".into(),
                source: std::io::Error::from_raw_os_error(libc::EAGAIN),
            },
            SandboxError::Os {
                what: "reading".into(),
                source: std::io::Error::other("custom"),
            },
        ];
        for err in errors {
            // Errors have no PartialEq; their messages must match.
            let message = err.to_string();
            let back = decode_result(&encode_result(&Err(err)))
                .unwrap()
                .unwrap_err();
            assert_eq!(back.to_string(), message);
        }
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        let request = encode_request(&SandboxRequest {
            argv: vec!["python3".into()],
            ..SandboxRequest::default()
        });
        for cut in 0..request.len() {
            assert!(decode_request(&request[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = request.clone();
        longer.push(0);
        assert!(decode_request(&longer).is_err());
        // A count far beyond what the frame holds.
        let mut huge = request;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_request(&huge).is_err());
        assert!(decode_result(&[7]).is_err());
        assert!(decode_result(&[0, 9, 0, 0, 0, 0]).is_err());
    }
}
