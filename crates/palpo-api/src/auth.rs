//! The access-token security scheme: `Authorization: Bearer <token>` or `?access_token=`.

use palpo_core::{Error, ErrorCode};
use palpo_service::{Authed, Services, accounts::Caller};
use poem::{Request, RequestBody};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaSecurityScheme, Registry},
};

use crate::error::MatrixError;

const BEARER: &str = "accessTokenBearer";
const QUERY: &str = "accessTokenQuery";

/// The authenticated caller of an operation. Extracting it validates the token.
pub struct AccessToken(pub Authed);

impl<'a> ApiExtractor<'a> for AccessToken {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        registry.create_security_scheme(
            BEARER,
            MetaSecurityScheme {
                ty: "http",
                description: Some("The access token, as `Authorization: Bearer <token>`."),
                name: None,
                key_in: None,
                scheme: Some("bearer"),
                bearer_format: None,
                flows: None,
                openid_connect_url: None,
            },
        );
        registry.create_security_scheme(
            QUERY,
            MetaSecurityScheme {
                ty: "apiKey",
                description: Some(
                    "The access token as the `access_token` query parameter (deprecated by the spec; prefer the header).",
                ),
                name: Some("access_token"),
                key_in: Some("query"),
                scheme: None,
                bearer_format: None,
                flows: None,
                openid_connect_url: None,
            },
        );
    }

    fn security_schemes() -> Vec<&'static str> {
        vec![BEARER, QUERY]
    }

    async fn from_request(
        req: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let (services, token) = services_and_token(req)?;
        let authed = services
            .accounts
            .authenticate(&token, client_ip(req).as_deref())
            .await
            .map_err(MatrixError::from)?;
        Ok(AccessToken(authed))
    }
}

/// The caller of an operation, possibly remembered from an earlier request without asking the
/// database ([`AccountService::authenticate_remembered`]): for the hot operations (send,
/// sync) whose service checks the token in the same statement as its own work. The handler
/// passes [`Caller::unchecked`] on and ends with [`AccountService::settle`]. Same security
/// schemes as [`AccessToken`].
///
/// [`AccountService::authenticate_remembered`]: palpo_service::AccountService::authenticate_remembered
/// [`AccountService::settle`]: palpo_service::AccountService::settle
/// [`Caller::unchecked`]: palpo_service::accounts::Caller::unchecked
pub struct RememberedAccessToken(pub Caller);

impl<'a> ApiExtractor<'a> for RememberedAccessToken {
    const TYPES: &'static [ApiExtractorType] = AccessToken::TYPES;
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        AccessToken::register(registry);
    }

    fn security_schemes() -> Vec<&'static str> {
        AccessToken::security_schemes()
    }

    async fn from_request(
        req: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let (services, token) = services_and_token(req)?;
        let caller = services
            .accounts
            .authenticate_remembered(&token, client_ip(req).as_deref())
            .await
            .map_err(MatrixError::from)?;
        Ok(RememberedAccessToken(caller))
    }
}

/// The services, and the request's access token (401 `M_MISSING_TOKEN` without one).
fn services_and_token(req: &Request) -> poem::Result<(&Services, String)> {
    let token = access_token(req).ok_or_else(|| {
        MatrixError::from(Error::new(ErrorCode::MissingToken, "Missing access token"))
    })?;
    let services = req
        .data::<Services>()
        .ok_or_else(|| MatrixError::from(Error::internal("services not attached")))?;
    Ok((services, token))
}

/// The token from the `Authorization` header, else from the `access_token` query parameter.
fn access_token(req: &Request) -> Option<String> {
    if let Some(header) = req.headers().get(poem::http::header::AUTHORIZATION) {
        let value = header.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
            .then(|| token.trim().to_owned());
    }
    req.uri().query().and_then(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "access_token")
            .map(|(_, token)| token.into_owned())
            .filter(|token| !token.is_empty())
    })
}

/// The client's address as seen by this server.
pub fn client_ip(req: &Request) -> Option<String> {
    req.remote_addr()
        .as_socket_addr()
        .map(|addr| addr.ip().to_string())
}
