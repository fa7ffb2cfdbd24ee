//! Our wire types against ruma's: every request is built by ruma (as a Matrix client library
//! would send it), sent to a running Palpo, and Palpo's answer is parsed by ruma's response
//! type, or by ruma's error types (`UiaaResponse`, `ruma::api::error::Error`) when it fails.
//! Any disagreement in paths, field names, types or required fields fails here.

use std::borrow::Cow;

use palpo_tests::{
    Backend, Config, TestApp,
    ruma_client::{describe, exchange, ok, parse},
    run, run_with,
};
use ruma::{
    OwnedDeviceId, RoomVersionId,
    api::{
        IncomingResponseExt, MatrixVersion, OutgoingRequestExt, SupportedVersions,
        auth_scheme::SendAccessToken,
        client::{
            account::{
                ThirdPartyIdRemovalStatus, change_password, deactivate, get_username_availability,
                register, whoami,
            },
            device::{delete_device, delete_devices, get_device, get_devices, update_device},
            discovery::{discover_homeserver, get_capabilities, get_supported_versions},
            session::{get_login_types, login, logout, logout_all},
            uiaa::{
                AuthData, AuthFlow, AuthType, Dummy, MatrixUserIdentifier, Password, UiaaInfo,
                UiaaResponse, UserIdentifier,
            },
        },
        error::{ErrorKind, FromHttpResponseError, RetryAfter, UnknownTokenErrorData},
    },
};

/// The UIA state of a 401, parsed by ruma.
#[track_caller]
fn uiaa<R>(resp: &http::Response<Vec<u8>>) -> UiaaInfo
where
    R: IncomingResponseExt<EndpointError = UiaaResponse> + std::fmt::Debug,
{
    match parse::<R>(resp) {
        Err(FromHttpResponseError::Server(UiaaResponse::AuthResponse(info))) => info,
        other => panic!("expected a UIA 401, got {other:?} from {}", describe(resp)),
    }
}

/// The Matrix error of a failed request, parsed by ruma.
#[track_caller]
fn matrix_error<R>(resp: &http::Response<Vec<u8>>) -> ruma::api::error::Error
where
    R: IncomingResponseExt<EndpointError = ruma::api::error::Error> + std::fmt::Debug,
{
    match parse::<R>(resp) {
        Err(FromHttpResponseError::Server(error)) => error,
        other => panic!("expected an error, got {other:?} from {}", describe(resp)),
    }
}

fn password_auth(user: &str, password: &str, session: Option<String>) -> AuthData {
    let mut password = Password::new(
        UserIdentifier::Matrix(MatrixUserIdentifier::new(user.to_owned())),
        password.to_owned(),
    );
    password.session = session;
    AuthData::Password(password)
}

/// Flows as comparable text. `Debug`, not the wire string, so that a stage ruma did not
/// recognise (`_Custom`) does not pass for the real one.
fn flows(flows: &[AuthFlow]) -> Vec<Vec<String>> {
    flows
        .iter()
        .map(|flow| flow.stages.iter().map(|s| format!("{s:?}")).collect())
        .collect()
}

fn password_flow() -> Vec<Vec<String>> {
    flows(&[AuthFlow::new(vec![AuthType::Password])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_requests_and_responses_round_trip() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let base = app.base_url.as_str();

        // Versions first, as a client does: they pick the paths of everything else.
        let req = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, ())
            .expect("request");
        let versions: get_supported_versions::Response = ok(&exchange(app, req).await);
        let supported =
            SupportedVersions::from_parts(&versions.versions, &versions.unstable_features);
        for version in [MatrixVersion::V1_1, MatrixVersion::V1_11] {
            assert!(
                supported.versions.contains(&version),
                "{:?}",
                versions.versions
            );
        }
        let supported = Cow::Borrowed(&supported);

        let req = discover_homeserver::Request::new()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, ())
            .expect("request");
        let discovery: discover_homeserver::Response = ok(&exchange(app, req).await);
        assert_eq!(discovery.homeserver.base_url, app.base_url);

        let req = get_login_types::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let types: get_login_types::v3::Response = ok(&exchange(app, req).await);
        assert!(
            types
                .flows
                .iter()
                .any(|f| matches!(f, get_login_types::v3::LoginType::Password(_))),
            "{:?}",
            types.flows
        );

        // Username availability: free, then (below) taken, and invalid.
        let available = |name: &str| {
            get_username_availability::v3::Request::new(name.to_owned())
                .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
                .expect("request")
        };
        let free: get_username_availability::v3::Response =
            ok(&exchange(app, available("ursula")).await);
        assert!(free.available);
        let invalid = matrix_error::<get_username_availability::v3::Response>(
            &exchange(app, available("Not Valid")).await,
        );
        assert_eq!(invalid.status_code, 400);
        assert!(
            matches!(invalid.error_kind(), Some(ErrorKind::InvalidUsername)),
            "{invalid:?}"
        );

        // Registration: two rounds of UIA.
        let mut register_req = register::v3::Request::new();
        register_req.username = Some("ursula".to_owned());
        register_req.password = Some("pw".to_owned());
        register_req.initial_device_display_name = Some("ruma".to_owned());
        let req = register_req
            .clone()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let info = uiaa::<register::v3::Response>(&exchange(app, req).await);
        assert_eq!(
            flows(&info.flows),
            flows(&[AuthFlow::new(vec![AuthType::Dummy])])
        );
        assert!(info.completed.is_empty());
        let mut dummy = Dummy::new();
        dummy.session = info.session.clone();
        register_req.auth = Some(AuthData::Dummy(dummy));
        let req = register_req
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let registered: register::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(registered.user_id.as_str(), "@ursula:test.local");
        let token = registered.access_token.expect("access token");
        let device_id = registered.device_id.expect("device id");

        let taken = matrix_error::<get_username_availability::v3::Response>(
            &exchange(app, available("ursula")).await,
        );
        assert!(
            matches!(taken.error_kind(), Some(ErrorKind::UserInUse)),
            "{taken:?}"
        );

        let req = whoami::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let me: whoami::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(me.user_id, registered.user_id);
        assert_eq!(me.device_id.as_ref(), Some(&device_id));
        assert!(!me.is_guest);

        let req = get_capabilities::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let caps: get_capabilities::v3::Response = ok(&exchange(app, req).await);
        assert!(caps.capabilities.change_password.enabled);
        assert_eq!(caps.capabilities.room_versions.default, RoomVersionId::V12);
        assert!(
            caps.capabilities
                .room_versions
                .available
                .contains_key(&RoomVersionId::V12)
        );

        // Login: by localpart; a wrong password is M_FORBIDDEN.
        let login_req = |password: &str| {
            login::v3::Request::new(login::v3::LoginInfo::Password(login::v3::Password::new(
                UserIdentifier::Matrix(MatrixUserIdentifier::new("ursula".to_owned())),
                password.to_owned(),
            )))
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request")
        };
        let second: login::v3::Response = ok(&exchange(app, login_req("pw")).await);
        assert_eq!(second.user_id, registered.user_id);
        assert_ne!(second.device_id, device_id);
        let third: login::v3::Response = ok(&exchange(app, login_req("pw")).await);
        let forbidden =
            matrix_error::<login::v3::Response>(&exchange(app, login_req("wrong")).await);
        assert_eq!(forbidden.status_code, 403);
        assert!(
            matches!(forbidden.error_kind(), Some(ErrorKind::Forbidden)),
            "{forbidden:?}"
        );

        // Devices.
        let req = get_devices::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let devices: get_devices::v3::Response = ok(&exchange(app, req).await);
        let mut ids: Vec<OwnedDeviceId> = devices
            .devices
            .iter()
            .map(|d| d.device_id.clone())
            .collect();
        ids.sort();
        let mut expected = vec![
            device_id.clone(),
            second.device_id.clone(),
            third.device_id.clone(),
        ];
        expected.sort();
        assert_eq!(ids, expected);

        let mut rename = update_device::v3::Request::new(second.device_id.clone());
        rename.display_name = Some("Renamed by ruma".to_owned());
        let req = rename
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let _: update_device::v3::Response = ok(&exchange(app, req).await);
        let req = get_device::v3::Request::new(second.device_id.clone())
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let device: get_device::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(device.device.device_id, second.device_id);
        assert_eq!(
            device.device.display_name.as_deref(),
            Some("Renamed by ruma")
        );
        assert!(device.device.last_seen_ts.is_some());

        let req = get_device::v3::Request::new("NOSUCHDEVICE".into())
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let missing = matrix_error::<get_device::v3::Response>(&exchange(app, req).await);
        assert_eq!(missing.status_code, 404);
        assert!(
            matches!(missing.error_kind(), Some(ErrorKind::NotFound)),
            "{missing:?}"
        );

        // Deleting a device: UIA with the password.
        let mut delete = delete_device::v3::Request::new(second.device_id.clone());
        let req = delete
            .clone()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let info = uiaa::<delete_device::v3::Response>(&exchange(app, req).await);
        assert_eq!(flows(&info.flows), password_flow());
        // A wrong password: still UIA, now with the error ruma reads as `auth_error`.
        delete.auth = Some(password_auth("ursula", "wrong", info.session.clone()));
        let req = delete
            .clone()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let failed = uiaa::<delete_device::v3::Response>(&exchange(app, req).await);
        let auth_error = failed.auth_error.expect("auth_error");
        assert!(
            matches!(auth_error.kind, ErrorKind::Forbidden),
            "{auth_error:?}"
        );
        assert_eq!(failed.session, info.session);
        delete.auth = Some(password_auth("ursula", "pw", info.session.clone()));
        let req = delete
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let _: delete_device::v3::Response = ok(&exchange(app, req).await);

        // A deleted device's token is unknown, with soft_logout false.
        let req = whoami::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&second.access_token),
                supported.clone(),
            )
            .expect("request");
        let unknown = matrix_error::<whoami::v3::Response>(&exchange(app, req).await);
        assert_eq!(unknown.status_code, 401);
        assert!(
            matches!(
                unknown.error_kind(),
                Some(ErrorKind::UnknownToken(UnknownTokenErrorData {
                    soft_logout: false,
                    ..
                }))
            ),
            "{unknown:?}"
        );

        // Deleting several devices.
        let mut delete_many = delete_devices::v3::Request::new(vec![third.device_id.clone()]);
        let req = delete_many
            .clone()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let info = uiaa::<delete_devices::v3::Response>(&exchange(app, req).await);
        assert_eq!(flows(&info.flows), password_flow());
        delete_many.auth = Some(password_auth("ursula", "pw", info.session));
        let req = delete_many
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let _: delete_devices::v3::Response = ok(&exchange(app, req).await);

        // Changing the password (the endpoint's token is optional to ruma: send it always).
        let mut change = change_password::v3::Request::new("new pw".to_owned());
        let req = change
            .clone()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::Always(&token),
                supported.clone(),
            )
            .expect("request");
        let info = uiaa::<change_password::v3::Response>(&exchange(app, req).await);
        assert_eq!(flows(&info.flows), password_flow());
        change.auth = Some(password_auth("ursula", "pw", info.session));
        let req = change
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::Always(&token),
                supported.clone(),
            )
            .expect("request");
        let _: change_password::v3::Response = ok(&exchange(app, req).await);
        let old = matrix_error::<login::v3::Response>(&exchange(app, login_req("pw")).await);
        assert!(
            matches!(old.error_kind(), Some(ErrorKind::Forbidden)),
            "{old:?}"
        );

        // Logout, and logout everywhere.
        let fourth: login::v3::Response = ok(&exchange(app, login_req("new pw")).await);
        let req = logout::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&fourth.access_token),
                supported.clone(),
            )
            .expect("request");
        let _: logout::v3::Response = ok(&exchange(app, req).await);
        let fifth: login::v3::Response = ok(&exchange(app, login_req("new pw")).await);
        let req = logout_all::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&fifth.access_token),
                supported.clone(),
            )
            .expect("request");
        let _: logout_all::v3::Response = ok(&exchange(app, req).await);
        let req = whoami::v3::Request::new()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::IfRequired(&token),
                supported.clone(),
            )
            .expect("request");
        let gone = matrix_error::<whoami::v3::Response>(&exchange(app, req).await);
        assert!(
            matches!(gone.error_kind(), Some(ErrorKind::UnknownToken(_))),
            "{gone:?}"
        );

        // Deactivation.
        let sixth: login::v3::Response = ok(&exchange(app, login_req("new pw")).await);
        let mut deactivate_req = deactivate::v3::Request::new();
        let req = deactivate_req
            .clone()
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::Always(&sixth.access_token),
                supported.clone(),
            )
            .expect("request");
        let info = uiaa::<deactivate::v3::Response>(&exchange(app, req).await);
        assert_eq!(flows(&info.flows), password_flow());
        deactivate_req.auth = Some(password_auth("ursula", "new pw", info.session));
        let req = deactivate_req
            .try_into_http_request::<Vec<u8>>(
                base,
                SendAccessToken::Always(&sixth.access_token),
                supported.clone(),
            )
            .expect("request");
        let done: deactivate::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(
            done.id_server_unbind_result,
            ThirdPartyIdRemovalStatus::NoSupport
        );
        let deactivated =
            matrix_error::<login::v3::Response>(&exchange(app, login_req("new pw")).await);
        assert!(
            matches!(deactivated.error_kind(), Some(ErrorKind::UserDeactivated)),
            "{deactivated:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_reads_rate_limits_and_registration_tokens() {
    let tweak = |config: &mut Config| {
        config.rate_limit.enabled = true;
        config.rate_limit.login.burst = 1;
        config.rate_limit.login.per_second = 0.01;
        config.registration.token = Some("secret-token".to_owned());
    };
    run_with(Backend::Sqlite, false, tweak, async |app: &TestApp| {
        let base = app.base_url.as_str();
        let supported = SupportedVersions::from_parts(&["v1.11".to_owned()], &Default::default());
        let supported = Cow::Borrowed(&supported);

        let mut register_req = register::v3::Request::new();
        register_req.username = Some("vera".to_owned());
        register_req.password = Some("pw".to_owned());
        let req = register_req
            .clone()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let info = uiaa::<register::v3::Response>(&exchange(app, req).await);
        assert_eq!(
            flows(&info.flows),
            flows(&[AuthFlow::new(vec![AuthType::RegistrationToken])])
        );
        register_req.auth = Some(AuthData::RegistrationToken({
            let mut token = ruma::api::client::uiaa::RegistrationToken::new("wrong".to_owned());
            token.session = info.session.clone();
            token
        }));
        let req = register_req
            .clone()
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let failed = uiaa::<register::v3::Response>(&exchange(app, req).await);
        let auth_error = failed.auth_error.expect("auth_error");
        assert!(
            matches!(auth_error.kind, ErrorKind::Unauthorized),
            "{auth_error:?}"
        );
        register_req.auth = Some(AuthData::RegistrationToken({
            let mut token =
                ruma::api::client::uiaa::RegistrationToken::new("secret-token".to_owned());
            token.session = info.session.clone();
            token
        }));
        let req = register_req
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request");
        let _: register::v3::Response = ok(&exchange(app, req).await);

        let login_req = || {
            login::v3::Request::new(login::v3::LoginInfo::Password(login::v3::Password::new(
                UserIdentifier::Matrix(MatrixUserIdentifier::new("vera".to_owned())),
                "pw".to_owned(),
            )))
            .try_into_http_request::<Vec<u8>>(base, SendAccessToken::None, supported.clone())
            .expect("request")
        };
        let _: login::v3::Response = ok(&exchange(app, login_req()).await);
        let limited = matrix_error::<login::v3::Response>(&exchange(app, login_req()).await);
        assert_eq!(limited.status_code, 429);
        match limited.error_kind() {
            Some(ErrorKind::LimitExceeded(data)) => match data.retry_after {
                Some(RetryAfter::Delay(delay)) => {
                    assert!(delay.as_secs() >= 90 && delay.as_secs() <= 100, "{delay:?}")
                }
                ref other => panic!("no usable retry_after: {other:?}"),
            },
            other => panic!("not M_LIMIT_EXCEEDED: {other:?}"),
        }
    })
    .await;
}
