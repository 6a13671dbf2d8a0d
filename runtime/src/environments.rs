//! The environments of a run: every built-in, plus the plugins and NeMo Gym servers its config
//! names, each checked before the run starts.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_environments::plugin::{RemoteEnvironment, RemoteOptions};
use chorus_environments::{NemoGym, NemoGymOptions, Registry, builtin_registry};
use chorus_orchestrator::config::{EnvironmentSource, RunConfig};

use crate::error::{Result, RunError};

/// The environments of a run: every built-in, plus a [`RemoteEnvironment`] for each plugin entry
/// (registered under its URL, the entry's key) and a [`NemoGym`] for each `nemo_gym` entry
/// (under its name). Plugins are asked to describe themselves now, so an absent plugin or a
/// wrong token fails the run before it starts, with the entry and the address named. Plugins
/// are called with their own credential: the variable an entry's `token_env` names, else
/// `plugin_token`; never with the run's shared token (a plugin is often someone else's code). Each call to a plugin or NeMo Gym server has the run's
/// environment deadline (`environment_faults.deadline_seconds`). Blocks while it connects: call
/// it from a blocking thread in async code.
pub fn environment_registry(cfg: &RunConfig, plugin_token: Option<&str>) -> Result<Registry> {
    let mut registry = builtin_registry();
    let builtins = registry.names();
    let mut added: BTreeMap<String, &EnvironmentSource> = BTreeMap::new();
    for (i, stage) in cfg.stages.iter().enumerate() {
        for (j, spec) in stage.environments.iter().enumerate() {
            let at = format!("stages[{i}].environments[{j}]");
            let error = |at: String| move |source| RunError::Environment { at, source };
            if let Some(earlier) = added.get(spec.key()) {
                if *earlier != &spec.source {
                    return Err(RunError::Invalid(format!(
                        "{at}: `{}` names two different environments in this config ({earlier:?} \
                         and {:?}); give them different names",
                        spec.key(),
                        spec.source
                    )));
                }
                continue;
            }
            match &spec.source {
                EnvironmentSource::Builtin(name) => {
                    registry.get(name).map_err(error(format!("{at}.name")))?;
                }
                EnvironmentSource::Remote { url, token_env } => {
                    let own_token;
                    let token = match token_env {
                        Some(var) => {
                            own_token = std::env::var(var).ok().filter(|t| !t.is_empty());
                            own_token.as_deref().ok_or_else(|| {
                                RunError::Invalid(format!(
                                    "{at}.token_env: the environment variable {var} (the token \
                                     of the plugin at {url}) is not set in this process"
                                ))
                            })?
                        }
                        None => plugin_token.ok_or_else(|| {
                            RunError::Invalid(format!(
                                "{at}.url: the environment plugin at {url} checks a token of \
                                 its own: give it with --plugin-token T or \
                                 CHORUS_PLUGIN_TOKEN=T (the token the plugin was started with), \
                                 or name a variable holding it with `token_env`; the run's own \
                                 token is never sent to plugins"
                            ))
                        })?,
                    };
                    let options = RemoteOptions {
                        timeout: cfg.environment_faults.deadline,
                        ..RemoteOptions::default()
                    };
                    let env = RemoteEnvironment::connect_with(url, token, options)
                        .map_err(error(format!("{at}.url: connecting to the plugin")))?;
                    tracing::info!(
                        plugin = env.plugin_info().name,
                        url,
                        "environment plugin `{}` at {url}",
                        env.plugin_info().name
                    );
                    registry.replace(Arc::new(env));
                }
                EnvironmentSource::NemoGym {
                    name,
                    url,
                    dataset,
                    max_turns,
                } => {
                    if builtins.contains(name) {
                        return Err(RunError::Invalid(format!(
                            "{at}.name: `{name}` is a built-in environment; give the nemo_gym \
                             entry another name"
                        )));
                    }
                    let env = NemoGym::from_jsonl_file(name.clone(), url, dataset)
                        .map_err(error(format!("{at}: reading the NeMo Gym dataset")))?
                        .with_options(NemoGymOptions {
                            timeout: cfg.environment_faults.deadline,
                            ..NemoGymOptions::default()
                        })
                        .with_max_turns(*max_turns)
                        .map_err(error(format!("{at}.max_turns")))?;
                    registry.replace(Arc::new(env));
                }
            }
            added.insert(spec.key().to_string(), &spec.source);
        }
    }
    Ok(registry)
}
