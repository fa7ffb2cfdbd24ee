//! User-interactive authentication (client-server spec, "User-interactive authentication API").
//!
//! An operation states the flows it accepts; [`Uia::check`] runs one round: with no `auth` it
//! opens a session and answers 401 with the flows; with `auth` it checks that stage, records
//! it in the session (stored in the database, so the next round may reach another process),
//! and either lets the operation proceed (a flow is complete) or answers 401 again.

use palpo_core::{Error, ErrorCode, Result, now_millis};
use palpo_storage::{Storage, StorageError, model::UiaSession};
use serde_json::{Map, Value, json};

use crate::credentials::{random_string, verify_password};

pub const DUMMY: &str = "m.login.dummy";
pub const PASSWORD: &str = "m.login.password";
pub const REGISTRATION_TOKEN: &str = "m.login.registration_token";

/// Sessions older than this are forgotten.
const SESSION_LIFETIME_MS: i64 = 60 * 60 * 1000;

/// What an operation asks for.
pub struct UiaRequest<'a> {
    /// Names the operation (`register`, `delete_devices`...): a session serves one purpose.
    pub purpose: &'a str,
    /// The user being authenticated, for operations on an existing account.
    pub user_id: Option<&'a str>,
    pub flows: Vec<Vec<&'static str>>,
    /// The client's `auth` object, if any.
    pub auth: Option<&'a Value>,
}

pub struct Uia {
    storage: Storage,
    server_name: String,
    registration_token: Option<String>,
}

impl Uia {
    pub fn new(storage: Storage, server_name: String, registration_token: Option<String>) -> Self {
        Uia {
            storage,
            server_name,
            registration_token,
        }
    }

    /// One round of authentication. `Ok(())` when a flow is complete and the operation may run.
    pub async fn check(&self, request: UiaRequest<'_>) -> Result<()> {
        let Some(auth) = request.auth else {
            let session = self.open_session(&request).await?;
            return Err(self.challenge(&request, &session, None));
        };
        let auth = auth
            .as_object()
            .ok_or_else(|| Error::bad_json("`auth` must be an object"))?;
        let mut session = match auth.get("session").and_then(Value::as_str) {
            Some(id) => self.load_session(id, &request).await?,
            // Clients may complete a single-stage flow in their first request.
            None => self.open_session(&request).await?,
        };
        let Some(stage) = auth.get("type").and_then(Value::as_str) else {
            // `auth` with only a session: the client asks where it stands.
            return Err(self.challenge(&request, &session, None));
        };
        if !request.flows.iter().any(|flow| flow.contains(&stage)) {
            return Err(Error::with_status(
                400,
                ErrorCode::Unrecognized,
                format!("{stage} is not a stage of any flow offered here"),
            ));
        }
        if let Err(failure) = self.check_stage(stage, auth, &request).await {
            return Err(self.challenge(&request, &session, Some(failure)));
        }
        if !session.completed.iter().any(|done| done == stage) {
            session.completed.push(stage.to_owned());
        }
        let complete = request.flows.iter().any(|flow| {
            flow.iter()
                .all(|s| session.completed.iter().any(|c| c == s))
        });
        if complete {
            self.storage
                .uia
                .delete_session(&session.session_id)
                .await
                .map_err(storage)?;
            Ok(())
        } else {
            self.storage
                .uia
                .update_session(&session)
                .await
                .map_err(storage)?;
            Err(self.challenge(&request, &session, None))
        }
    }

    async fn open_session(&self, request: &UiaRequest<'_>) -> Result<UiaSession> {
        let now = now_millis();
        // Forgetting expired sessions here keeps the table small without a background job.
        self.storage
            .uia
            .delete_sessions_before(now - SESSION_LIFETIME_MS)
            .await
            .map_err(storage)?;
        let session = UiaSession {
            session_id: random_string(24),
            user_id: request.user_id.map(str::to_owned),
            purpose: request.purpose.to_owned(),
            completed: Vec::new(),
            data: String::new(),
            created_at: now,
        };
        self.storage
            .uia
            .create_session(&session)
            .await
            .map_err(storage)?;
        Ok(session)
    }

    async fn load_session(&self, id: &str, request: &UiaRequest<'_>) -> Result<UiaSession> {
        let session = self
            .storage
            .uia
            .get_session(id)
            .await
            .map_err(storage)?
            .filter(|s| s.created_at >= now_millis() - SESSION_LIFETIME_MS)
            .ok_or_else(|| Error::with_status(400, ErrorCode::Unknown, "Unknown session"))?;
        if session.purpose != request.purpose || session.user_id.as_deref() != request.user_id {
            return Err(Error::forbidden(
                "This session was started for another operation",
            ));
        }
        Ok(session)
    }

    /// Checks one stage. `Err` carries the errcode and message for the 401 body.
    async fn check_stage(
        &self,
        stage: &str,
        auth: &Map<String, Value>,
        request: &UiaRequest<'_>,
    ) -> Result<(), (ErrorCode, String)> {
        match stage {
            DUMMY => Ok(()),
            REGISTRATION_TOKEN => {
                let given = auth.get("token").and_then(Value::as_str);
                match (&self.registration_token, given) {
                    (Some(expected), Some(given))
                        if constant_time_eq(expected.as_bytes(), given.as_bytes()) =>
                    {
                        Ok(())
                    }
                    _ => Err((
                        ErrorCode::Unauthorized,
                        "Invalid registration token".to_owned(),
                    )),
                }
            }
            PASSWORD => {
                let forbidden = || (ErrorCode::Forbidden, "Invalid password".to_owned());
                let user_id = request.user_id.ok_or_else(forbidden)?;
                let claimed = auth
                    .get("identifier")
                    .and_then(|id| id.get("user"))
                    .or_else(|| auth.get("user"))
                    .and_then(Value::as_str);
                if let Some(claimed) = claimed {
                    let full = if claimed.starts_with('@') {
                        claimed.to_owned()
                    } else {
                        format!("@{claimed}:{}", self.server_name)
                    };
                    if full != user_id {
                        return Err(forbidden());
                    }
                }
                let password = auth
                    .get("password")
                    .and_then(Value::as_str)
                    .ok_or_else(forbidden)?;
                let user = self
                    .storage
                    .users
                    .get_user(user_id)
                    .await
                    .map_err(|_| forbidden())?;
                let hash = user.and_then(|u| u.password_hash).ok_or_else(forbidden)?;
                match verify_password(password.to_owned(), hash).await {
                    Ok(true) => Ok(()),
                    _ => Err(forbidden()),
                }
            }
            other => Err((
                ErrorCode::Unrecognized,
                format!("Unsupported authentication stage {other}"),
            )),
        }
    }

    fn challenge(
        &self,
        request: &UiaRequest<'_>,
        session: &UiaSession,
        failure: Option<(ErrorCode, String)>,
    ) -> Error {
        let flows: Vec<Value> = request
            .flows
            .iter()
            .map(|stages| json!({ "stages": stages }))
            .collect();
        let mut body = json!({
            "flows": flows,
            "params": {},
            "session": session.session_id,
            "completed": session.completed,
        });
        if let (Some((code, message)), Some(map)) = (failure, body.as_object_mut()) {
            map.insert("errcode".into(), code.as_str().into());
            map.insert("error".into(), message.into());
        }
        Error::UiaRequired(body)
    }
}

fn storage(err: StorageError) -> Error {
    Error::internal(err)
}

/// Compares secrets without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
