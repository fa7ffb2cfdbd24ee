//! Accounts, devices and access tokens: registration, login, logout, password change,
//! deactivation, device management, and resolving an access token to its owner.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use palpo_core::{Config, Error, ErrorCode, Result, now_millis};
/// A device as storage keeps it (plain data), re-exported so the api need not name storage.
pub use palpo_storage::model::DeviceRecord;
use palpo_storage::{
    Storage, StorageError,
    model::{DeviceLogin, NewUser, ProfileRecord, Removed, TokenCheck, TokenOwner},
};
use serde_json::Value;

use crate::{
    E2eeService,
    credentials::{
        self, hash_password, new_access_token, new_device_id, random_string, token_hash,
        verify_password,
    },
    internal,
    uia::{self, Uia, UiaRequest},
};

/// The owner of a valid access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authed {
    pub user_id: String,
    pub device_id: String,
}

/// The caller of a request whose handler checks the access token itself, where the request
/// first touches the database (see [`AccountService::authenticate_remembered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub authed: Authed,
    /// `Some` when the token was taken from this process's memory without asking the
    /// database: it may have been revoked since (by any process), so it is still to check.
    pub unchecked: Option<TokenCheck>,
}

/// A password login (`m.login.password` with an `m.id.user` identifier).
#[derive(Debug, Clone)]
pub struct PasswordLogin {
    /// A localpart or a full user id.
    pub user: String,
    pub password: String,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
}

/// A registration request (`POST /register`).
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub guest: bool,
    pub auth: Option<Value>,
}

/// A new session: what login and registration hand back.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    /// `None` when registration was asked not to log in.
    pub access_token: Option<String>,
    pub device_id: Option<String>,
}

/// Longest password accepted, so a huge one cannot make argon2 a denial of service.
const MAX_PASSWORD_BYTES: usize = 512;
/// How often a device's "last seen" is written at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(300);
/// Most access tokens a process remembers (see [`AccountService::authenticate_remembered`]);
/// when full, it starts over.
const REMEMBERED_TOKENS: usize = 10_000;

pub struct AccountService {
    config: Arc<Config>,
    storage: Storage,
    uia: Uia,
    /// When each device's "last seen" was last written, so that not every request writes.
    touched: Mutex<HashMap<(String, String), Instant>>,
    /// Owners of access tokens (by hash) this process has looked up: a hint, checked where
    /// each request using it touches the database.
    remembered: Mutex<HashMap<String, TokenOwner>>,
    /// Told of deleted devices, whose keys and to-device inboxes go with them.
    e2ee: Option<Arc<E2eeService>>,
}

impl AccountService {
    pub fn new(config: Arc<Config>, storage: Storage) -> Self {
        let uia = Uia::new(
            storage.clone(),
            config.server_name.clone(),
            config.registration.token.clone(),
        );
        AccountService {
            config,
            storage,
            uia,
            touched: Mutex::new(HashMap::new()),
            remembered: Mutex::new(HashMap::new()),
            e2ee: None,
        }
    }

    /// Deleting a device also deletes its end-to-end encryption keys and to-device inbox, and
    /// records a device-list change.
    pub fn with_e2ee(mut self, e2ee: Arc<E2eeService>) -> Self {
        self.e2ee = Some(e2ee);
        self
    }

    /// Forgets the keys and inboxes of devices that were just deleted.
    async fn devices_deleted(&self, user_id: &str, removed: &Removed) -> Result<()> {
        match &self.e2ee {
            Some(e2ee) if !removed.device_ids.is_empty() => {
                e2ee.devices_deleted(user_id, &removed.device_ids).await
            }
            _ => Ok(()),
        }
    }

    pub fn server_name(&self) -> &str {
        &self.config.server_name
    }

    /// Resolves an access token to its owner: 401 `M_UNKNOWN_TOKEN` when unknown.
    #[tracing::instrument(skip_all)]
    pub async fn authenticate(&self, access_token: &str, ip: Option<&str>) -> Result<Authed> {
        let owner = self
            .storage
            .devices
            .find_token(&token_hash(access_token))
            .await
            .map_err(internal)?
            .ok_or_else(Error::unknown_token)?;
        self.maybe_touch(&owner.user_id, &owner.device_id, ip).await;
        Ok(Authed {
            user_id: owner.user_id,
            device_id: owner.device_id,
        })
    }

    /// Resolves an access token from this process's memory of the tokens it looked up, else
    /// as [`AccountService::authenticate`] (and remembers it). Saves the lookup, a database
    /// round trip, on the requests clients repeat the most (sends and syncs).
    ///
    /// The memory may be stale: another process (or this one) may have logged the device out.
    /// So a remembered token comes back in [`Caller::unchecked`], and the request must check
    /// it where it first touches the database, in the same statement or transaction as its
    /// work (a send in its event's write, a sync in its position read), and report errors only
    /// after checking it ([`AccountService::settle`]).
    #[tracing::instrument(skip_all)]
    pub async fn authenticate_remembered(
        &self,
        access_token: &str,
        ip: Option<&str>,
    ) -> Result<Caller> {
        let hash = token_hash(access_token);
        let remembered = self
            .remembered
            .lock()
            .ok()
            .and_then(|memory| memory.get(&hash).cloned());
        if let Some(owner) = remembered {
            self.maybe_touch(&owner.user_id, &owner.device_id, ip).await;
            return Ok(Caller {
                unchecked: Some(TokenCheck {
                    token_hash: hash,
                    user_id: owner.user_id.clone(),
                    device_id: owner.device_id.clone(),
                }),
                authed: Authed {
                    user_id: owner.user_id,
                    device_id: owner.device_id,
                },
            });
        }
        let authed = self.authenticate(access_token, ip).await?;
        if let Ok(mut memory) = self.remembered.lock() {
            if memory.len() >= REMEMBERED_TOKENS {
                memory.clear();
            }
            memory.insert(
                hash,
                TokenOwner {
                    user_id: authed.user_id.clone(),
                    device_id: authed.device_id.clone(),
                },
            );
        }
        Ok(Caller {
            authed,
            unchecked: None,
        })
    }

    /// Checks a remembered token against the database: 401 `M_UNKNOWN_TOKEN` (and forgotten)
    /// when it no longer belongs to the caller's device.
    pub async fn check_token(&self, caller: &Caller) -> Result<()> {
        let Some(check) = &caller.unchecked else {
            return Ok(());
        };
        let checked = credentials::check_token(&self.storage, check).await;
        if checked
            .as_ref()
            .is_err_and(|e| e.code() == ErrorCode::UnknownToken)
        {
            self.forget_token(check);
        }
        checked
    }

    fn forget_token(&self, check: &TokenCheck) {
        if let Ok(mut memory) = self.remembered.lock() {
            memory.remove(&check.token_hash);
        }
    }

    /// The outcome of a request made with a remembered token: a token found gone is forgotten;
    /// any other error is reported only once the token is checked (a client whose token was
    /// revoked learns that, not what it could no longer do).
    pub async fn settle<T>(&self, caller: &Caller, outcome: Result<T>) -> Result<T> {
        let Err(error) = outcome else {
            return outcome;
        };
        match &caller.unchecked {
            Some(check) if error.code() == ErrorCode::UnknownToken => {
                self.forget_token(check);
                Err(error)
            }
            Some(_) => {
                self.check_token(caller).await?;
                Err(error)
            }
            None => Err(error),
        }
    }

    async fn maybe_touch(&self, user_id: &str, device_id: &str, ip: Option<&str>) {
        let key = (user_id.to_owned(), device_id.to_owned());
        let due = match self.touched.lock() {
            Ok(mut touched) => {
                let due = touched
                    .get(&key)
                    .is_none_or(|at| at.elapsed() >= TOUCH_INTERVAL);
                if due {
                    touched.insert(key, Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if due
            && let Err(e) = self
                .storage
                .devices
                .touch_device(user_id, device_id, ip, now_millis())
                .await
        {
            // Last-seen is informational: never fail a request over it.
            tracing::warn!(error = %e, "could not record device last-seen");
        }
    }

    /// The full user id for a localpart or user id given by a client, if it is local.
    fn local_user_id(&self, user: &str) -> Result<String> {
        if let Some(rest) = user.strip_prefix('@') {
            let (localpart, server) = rest
                .split_once(':')
                .ok_or_else(|| Error::invalid_param("Malformed user id"))?;
            if server != self.config.server_name {
                return Err(Error::forbidden("Invalid username or password"));
            }
            Ok(format!("@{}:{}", localpart.to_lowercase(), server))
        } else {
            Ok(format!(
                "@{}:{}",
                user.to_lowercase(),
                self.config.server_name
            ))
        }
    }

    #[tracing::instrument(skip_all, fields(user = %login.user))]
    pub async fn login_password(&self, login: PasswordLogin, ip: Option<&str>) -> Result<Session> {
        let forbidden = || Error::forbidden("Invalid username or password");
        if login.password.len() > MAX_PASSWORD_BYTES {
            return Err(forbidden());
        }
        let user_id = self.local_user_id(&login.user)?;
        let user = self
            .storage
            .users
            .get_user(&user_id)
            .await
            .map_err(internal)?;
        let Some(user) = user else {
            // Spend the time a real check takes, so response times do not reveal who exists.
            let _ = verify_password(login.password, DUMMY_HASH.to_owned()).await;
            return Err(forbidden());
        };
        if user.is_deactivated {
            return Err(Error::new(
                ErrorCode::UserDeactivated,
                "This account has been deactivated",
            ));
        }
        let hash = user.password_hash.ok_or_else(forbidden)?;
        if !verify_password(login.password, hash).await? {
            return Err(forbidden());
        }
        self.open_session(
            &user_id,
            login.device_id,
            login.initial_device_display_name,
            ip,
        )
        .await
    }

    /// Creates (or reuses) a device and gives it a fresh access token.
    async fn open_session(
        &self,
        user_id: &str,
        device_id: Option<String>,
        display_name: Option<String>,
        ip: Option<&str>,
    ) -> Result<Session> {
        let device_id = match device_id {
            Some(id) if !id.is_empty() => {
                if id.len() > 255 {
                    return Err(Error::invalid_param("device_id is longer than 255 bytes"));
                }
                id
            }
            _ => new_device_id(),
        };
        let access_token = new_access_token();
        self.storage
            .devices
            .login_device(&DeviceLogin {
                user_id: user_id.to_owned(),
                device_id: device_id.clone(),
                display_name,
                token_hash: token_hash(&access_token),
                ip: ip.map(str::to_owned),
                now: now_millis(),
            })
            .await
            .map_err(internal)?;
        Ok(Session {
            user_id: user_id.to_owned(),
            access_token: Some(access_token),
            device_id: Some(device_id),
        })
    }

    /// Checks a requested localpart and returns the full user id. Upper-case is refused, as
    /// the spec allows only `a-z 0-9 . _ = - / +` in new localparts.
    pub fn validate_new_localpart(&self, localpart: &str) -> Result<String> {
        let invalid = |why: &str| Error::new(ErrorCode::InvalidUsername, why);
        if localpart.is_empty() {
            return Err(invalid("The username must not be empty"));
        }
        if !localpart
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
        {
            return Err(invalid(
                "The username may contain only a-z, 0-9, '.', '_', '=', '-', '/' and '+'",
            ));
        }
        let user_id = format!("@{localpart}:{}", self.config.server_name);
        if user_id.len() > 255 {
            return Err(invalid("The user id would be longer than 255 bytes"));
        }
        Ok(user_id)
    }

    /// `GET /register/available`.
    pub async fn username_available(&self, localpart: &str) -> Result<()> {
        let user_id = self.validate_new_localpart(localpart)?;
        match self
            .storage
            .users
            .get_user(&user_id)
            .await
            .map_err(internal)?
        {
            Some(_) => Err(Error::new(ErrorCode::UserInUse, "User ID already taken")),
            None => Ok(()),
        }
    }

    /// `POST /register`: user-interactive (dummy, or registration token when configured).
    #[tracing::instrument(skip_all)]
    pub async fn register(&self, request: Registration, ip: Option<&str>) -> Result<Session> {
        if !self.config.registration.enabled {
            return Err(Error::forbidden("Registration is disabled on this server"));
        }
        if request.guest {
            return Err(Error::new(
                ErrorCode::GuestAccessForbidden,
                "Guest access is not supported on this server",
            ));
        }
        // Check the name before authentication, so a client learns of a taken name at once.
        if let Some(username) = &request.username {
            self.username_available(username).await?;
        }
        if let Some(password) = &request.password {
            check_new_password(password)?;
        }
        let flow = if self.config.registration.token.is_some() {
            uia::REGISTRATION_TOKEN
        } else {
            uia::DUMMY
        };
        self.uia
            .check(UiaRequest {
                purpose: "register",
                user_id: None,
                flows: vec![vec![flow]],
                auth: request.auth.as_ref(),
            })
            .await?;
        let password = request
            .password
            .ok_or_else(|| Error::missing_param("Missing parameter: password"))?;
        let user_id = match request.username {
            Some(username) => self.validate_new_localpart(&username)?,
            None => format!(
                "@{}:{}",
                random_string(12).to_lowercase(),
                self.config.server_name
            ),
        };
        self.create_account(&user_id, Some(password), false).await?;
        tracing::info!(%user_id, "registered");
        if request.inhibit_login {
            return Ok(Session {
                user_id,
                access_token: None,
                device_id: None,
            });
        }
        self.open_session(
            &user_id,
            request.device_id,
            request.initial_device_display_name,
            ip,
        )
        .await
    }

    /// Creates an account directly (no UIA): registration after auth, and the admin CLI.
    pub async fn create_account(
        &self,
        user_id: &str,
        password: Option<String>,
        is_admin: bool,
    ) -> Result<()> {
        let password_hash = match password {
            Some(password) => {
                check_new_password(&password)?;
                Some(hash_password(password).await?)
            }
            None => None,
        };
        self.storage
            .users
            .create_user(&NewUser {
                user_id: user_id.to_owned(),
                password_hash,
                is_admin,
                created_at: now_millis(),
            })
            .await
            .map_err(|e| match e {
                StorageError::Conflict(_) => {
                    Error::new(ErrorCode::UserInUse, "User ID already taken")
                }
                other => internal(other),
            })?;
        // As other servers do, a new account's display name starts as its localpart.
        let localpart = user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split(':').next())
            .map(str::to_owned);
        self.storage
            .profiles
            .set_profile(
                user_id,
                &ProfileRecord {
                    displayname: localpart,
                    avatar_url: None,
                    fields: "{}".into(),
                },
            )
            .await
            .map_err(internal)
    }

    /// `POST /logout`: this device and its token go.
    pub async fn logout(&self, authed: &Authed) -> Result<()> {
        let removed = self
            .storage
            .devices
            .delete_devices(&authed.user_id, std::slice::from_ref(&authed.device_id))
            .await
            .map_err(internal)?;
        self.devices_deleted(&authed.user_id, &removed).await
    }

    /// `POST /logout/all`: every device of the user goes.
    pub async fn logout_all(&self, authed: &Authed) -> Result<()> {
        let removed = self
            .storage
            .devices
            .delete_all_devices(&authed.user_id, None)
            .await
            .map_err(internal)?;
        self.devices_deleted(&authed.user_id, &removed).await
    }

    fn password_flows() -> Vec<Vec<&'static str>> {
        vec![vec![uia::PASSWORD]]
    }

    /// `POST /account/password`. Other devices are logged out unless `logout_devices` is false.
    pub async fn change_password(
        &self,
        authed: &Authed,
        new_password: String,
        logout_devices: bool,
        auth: Option<&Value>,
    ) -> Result<()> {
        check_new_password(&new_password)?;
        self.uia
            .check(UiaRequest {
                purpose: "change_password",
                user_id: Some(&authed.user_id),
                flows: Self::password_flows(),
                auth,
            })
            .await?;
        let hash = hash_password(new_password).await?;
        self.storage
            .users
            .set_password_hash(&authed.user_id, Some(&hash))
            .await
            .map_err(internal)?;
        if logout_devices {
            let removed = self
                .storage
                .devices
                .delete_all_devices(&authed.user_id, Some(&authed.device_id))
                .await
                .map_err(internal)?;
            self.devices_deleted(&authed.user_id, &removed).await?;
        }
        Ok(())
    }

    /// `POST /account/deactivate`: every device and token goes, the id stays reserved.
    pub async fn deactivate(&self, authed: &Authed, auth: Option<&Value>) -> Result<()> {
        self.uia
            .check(UiaRequest {
                purpose: "deactivate",
                user_id: Some(&authed.user_id),
                flows: Self::password_flows(),
                auth,
            })
            .await?;
        self.storage
            .users
            .deactivate_user(&authed.user_id)
            .await
            .map_err(internal)?;
        let removed = self
            .storage
            .devices
            .delete_all_devices(&authed.user_id, None)
            .await
            .map_err(internal)?;
        self.devices_deleted(&authed.user_id, &removed).await?;
        tracing::info!(user_id = %authed.user_id, "deactivated");
        Ok(())
    }

    pub async fn devices(&self, authed: &Authed) -> Result<Vec<DeviceRecord>> {
        self.storage
            .devices
            .list_devices(&authed.user_id)
            .await
            .map_err(internal)
    }

    pub async fn device(&self, authed: &Authed, device_id: &str) -> Result<DeviceRecord> {
        self.storage
            .devices
            .get_device(&authed.user_id, device_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Device not found"))
    }

    /// `PUT /devices/{deviceId}`.
    pub async fn rename_device(
        &self,
        authed: &Authed,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<()> {
        if display_name.is_some_and(|name| name.len() > 255) {
            return Err(Error::invalid_param(
                "display_name is longer than 255 bytes",
            ));
        }
        let found = self
            .storage
            .devices
            .set_device_display_name(&authed.user_id, device_id, display_name)
            .await
            .map_err(internal)?;
        if found {
            Ok(())
        } else {
            Err(Error::not_found("Device not found"))
        }
    }

    /// `DELETE /devices/{deviceId}` and `POST /delete_devices`: password re-authentication.
    pub async fn delete_devices(
        &self,
        authed: &Authed,
        device_ids: &[String],
        auth: Option<&Value>,
    ) -> Result<()> {
        self.uia
            .check(UiaRequest {
                purpose: "delete_devices",
                user_id: Some(&authed.user_id),
                flows: Self::password_flows(),
                auth,
            })
            .await?;
        let removed = self
            .storage
            .devices
            .delete_devices(&authed.user_id, device_ids)
            .await
            .map_err(internal)?;
        self.devices_deleted(&authed.user_id, &removed).await
    }
}

fn check_new_password(password: &str) -> Result<()> {
    if password.is_empty() {
        return Err(Error::new(
            ErrorCode::WeakPassword,
            "The password must not be empty",
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::invalid_param(format!(
            "The password is longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// An argon2 hash of a random password, checked against when the user does not exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3BHnOZqRLXFu6o6XAOOhsHJ5ylWR3cHRpsxjMZ1WJ6s";
