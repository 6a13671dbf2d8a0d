//! Running a Python script of Chorus' own in the sandbox, for the built-in environments that
//! verify through one (`sql` runs queries, `swe` runs tests): the script is written beside
//! the request's files and run by the sandbox's Python in isolated mode. Both environments take
//! the [`Runner`] as an argument, so their tests can put a stand-in where the sandbox would be.

use crate::sandbox::{self, Limits, Outcome, SandboxRequest};

/// How a prepared request is run: [`run_in_sandbox`] in production; tests may run it directly.
pub(crate) type Runner = fn(&SandboxRequest) -> Result<Outcome, String>;

/// A Python script compiled into Chorus and the relative path it runs from.
pub(crate) struct Script {
    /// Where the script is written in the sandbox's private directory.
    pub path: &'static str,
    /// The script itself.
    pub source: &'static str,
}

impl Script {
    /// A request that runs the script with `args` among `files`. A file of the request at the
    /// script's own path is dropped (model-written files must not replace the verifier), and
    /// the script comes last. `argv[0]` is a stand-in that [`run_in_sandbox`] replaces by the
    /// sandbox's Python; `-I -B` keep the user's site and the working directory's modules out
    /// and write no bytecode.
    pub(crate) fn request(
        &self,
        args: impl IntoIterator<Item = String>,
        files: Vec<(String, Vec<u8>)>,
        stdin: Vec<u8>,
        limits: Limits,
    ) -> SandboxRequest {
        let mut files: Vec<_> = files
            .into_iter()
            .filter(|(path, _)| path != self.path)
            .collect();
        files.push((self.path.into(), self.source.as_bytes().to_vec()));
        let mut argv = vec![
            "python3".to_string(),
            "-I".into(),
            "-B".into(),
            self.path.into(),
        ];
        argv.extend(args);
        SandboxRequest {
            argv,
            files,
            stdin,
            limits,
        }
    }
}

/// Runs `request` in the process-wide sandbox, its `argv[0]` replaced by the sandbox's Python.
pub(crate) fn run_in_sandbox(request: &SandboxRequest) -> Result<Outcome, String> {
    let sandbox = sandbox::shared().map_err(|err| format!("the sandbox is unavailable: {err}"))?;
    let mut request = request.clone();
    if let Some(program) = request.argv.first_mut() {
        *program = sandbox.python().to_string();
    }
    sandbox
        .run(&request)
        .map_err(|err| format!("the sandbox failed to start: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: Script = Script {
        path: "check.py",
        source: "import sys\nprint(sys.stdin.read().upper(), *sys.argv[1:])\n",
    };

    #[test]
    fn the_script_runs_last_and_cannot_be_replaced() {
        let r = SCRIPT.request(
            ["a".to_string(), "b".to_string()],
            vec![
                ("x.py".into(), b"x".to_vec()),
                ("check.py".into(), b"forged".to_vec()),
                ("y.py".into(), b"y".to_vec()),
            ],
            b"in".to_vec(),
            Limits::default(),
        );
        assert_eq!(r.argv, ["python3", "-I", "-B", "check.py", "a", "b"]);
        let paths: Vec<&str> = r.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["x.py", "y.py", "check.py"]);
        assert_eq!(r.files[2].1, SCRIPT.source.as_bytes());
        assert_eq!(r.stdin, b"in");
    }

    #[test]
    fn the_script_runs_in_the_sandbox() {
        let request = SCRIPT.request(
            ["arg".to_string()],
            Vec::new(),
            b"hello".to_vec(),
            Limits::default(),
        );
        let outcome = run_in_sandbox(&request).unwrap();
        assert!(outcome.success(), "{}", outcome.reason());
        assert_eq!(String::from_utf8_lossy(&outcome.stdout), "HELLO arg\n");
    }
}
