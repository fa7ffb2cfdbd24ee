//! Push rules (`/pushrules`): the user's rules deciding which events notify them. Only the
//! `global` scope exists; the rules are the user's own, named by their access token.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::{
    Enum, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use serde_json::Value;

use crate::{
    ApiTags, AppState,
    auth::AccessToken,
    client::{
        rooms::{JsonObject, object_value, value_object},
        session::EmptyResponse,
    },
    error::ApiResult,
};

/// The kind of a push rule, which sets its priority: `override` first, then `content`,
/// `room`, `sender`, and `underride` last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum PushRuleKind {
    Override,
    Underride,
    Sender,
    Room,
    Content,
}

impl PushRuleKind {
    fn as_str(self) -> &'static str {
        match self {
            PushRuleKind::Override => "override",
            PushRuleKind::Underride => "underride",
            PushRuleKind::Sender => "sender",
            PushRuleKind::Room => "room",
            PushRuleKind::Content => "content",
        }
    }
}

#[derive(Debug, Object)]
pub struct PushRulesResponse {
    /// The ruleset of the `global` scope: rules by kind (`override`, `content`, `room`,
    /// `sender`, `underride`), each kind's list in priority order.
    pub global: JsonObject,
}

#[derive(Debug, Object)]
pub struct PushRuleEnabled {
    /// Whether the push rule is enabled.
    pub enabled: bool,
}

#[derive(Debug, Object)]
pub struct PushRuleActions {
    /// The actions of the rule: `"notify"`, `{"set_tweak": ...}`; none for a rule that keeps
    /// matching events quiet.
    pub actions: Vec<Value>,
}

pub struct PushRulesApi;

#[OpenApi]
impl PushRulesApi {
    /// All the user's push rules, the server-default ones included. They are also in the
    /// `m.push_rules` account data of `/sync`. The spec's path ends in a slash
    /// (`/pushrules/`); both forms are served.
    #[oai(
        path = "/_matrix/client/v3/pushrules",
        method = "get",
        tag = "ApiTags::PushNotifications",
        operation_id = "getPushRules"
    )]
    async fn get_push_rules(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<PushRulesResponse>> {
        let global = state
            .services
            .account_data
            .push_rules(&auth.0.user_id)
            .await?;
        Ok(Json(PushRulesResponse {
            global: value_object(global),
        }))
    }

    /// The user's push rules of the `global` scope (the ruleset itself); also served as
    /// `/pushrules/global/`, the spec's form.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global",
        method = "get",
        tag = "ApiTags::PushNotifications",
        operation_id = "getPushRulesGlobal"
    )]
    async fn get_push_rules_global(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<JsonObject>> {
        let global = state
            .services
            .account_data
            .push_rules(&auth.0.user_id)
            .await?;
        Ok(Json(value_object(global)))
    }

    /// One push rule; 404 `M_NOT_FOUND` when the user has no such rule.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId",
        method = "get",
        tag = "ApiTags::PushNotifications",
        operation_id = "getPushRule"
    )]
    async fn get_push_rule(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
    ) -> ApiResult<Json<JsonObject>> {
        let rule = state
            .services
            .account_data
            .push_rule(&auth.0.user_id, kind.0.as_str(), &rule_id.0)
            .await?;
        Ok(Json(value_object(rule)))
    }

    /// Creates or replaces a rule of the user's. The body holds its `actions`, and its
    /// `conditions` (`override`, `underride`) or `pattern` (`content`); a `room` rule's id is
    /// the room's ID, a `sender` rule's the sender's. A new rule comes first of its kind unless
    /// placed `before` or `after` another rule of the user's. Ids starting with `.` are the
    /// server's (400).
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId",
        method = "put",
        tag = "ApiTags::PushNotifications",
        operation_id = "setPushRule"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn set_push_rule(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
        /// The rule the new one comes just before (higher priority).
        before: Query<Option<String>>,
        /// The rule the new one comes just after (lower priority).
        after: Query<Option<String>>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .account_data
            .set_push_rule(
                &auth.0.user_id,
                kind.0.as_str(),
                &rule_id.0,
                &object_value(body.0),
                before.0.as_deref(),
                after.0.as_deref(),
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Deletes a rule of the user's; 404 `M_NOT_FOUND` when the user has no such rule of
    /// their own. Server-default rules cannot be deleted (404), only disabled.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId",
        method = "delete",
        tag = "ApiTags::PushNotifications",
        operation_id = "deletePushRule"
    )]
    async fn delete_push_rule(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .account_data
            .delete_push_rule(&auth.0.user_id, kind.0.as_str(), &rule_id.0)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Whether a push rule is enabled.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId/enabled",
        method = "get",
        tag = "ApiTags::PushNotifications",
        operation_id = "isPushRuleEnabled"
    )]
    async fn is_push_rule_enabled(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
    ) -> ApiResult<Json<PushRuleEnabled>> {
        let enabled = state
            .services
            .account_data
            .push_rule_enabled(&auth.0.user_id, kind.0.as_str(), &rule_id.0)
            .await?;
        Ok(Json(PushRuleEnabled { enabled }))
    }

    /// Enables or disables a push rule, the server-default ones included.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId/enabled",
        method = "put",
        tag = "ApiTags::PushNotifications",
        operation_id = "setPushRuleEnabled"
    )]
    async fn set_push_rule_enabled(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
        body: Json<PushRuleEnabled>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .account_data
            .set_push_rule_enabled(&auth.0.user_id, kind.0.as_str(), &rule_id.0, body.0.enabled)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// The actions of a push rule.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId/actions",
        method = "get",
        tag = "ApiTags::PushNotifications",
        operation_id = "getPushRuleActions"
    )]
    async fn get_push_rule_actions(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
    ) -> ApiResult<Json<PushRuleActions>> {
        let actions = state
            .services
            .account_data
            .push_rule_actions(&auth.0.user_id, kind.0.as_str(), &rule_id.0)
            .await?;
        let actions = match actions {
            Value::Array(actions) => actions,
            _ => Vec::new(),
        };
        Ok(Json(PushRuleActions { actions }))
    }

    /// Sets the actions of a push rule, the server-default ones included.
    #[oai(
        path = "/_matrix/client/v3/pushrules/global/:kind/:ruleId/actions",
        method = "put",
        tag = "ApiTags::PushNotifications",
        operation_id = "setPushRuleActions"
    )]
    async fn set_push_rule_actions(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        kind: Path<PushRuleKind>,
        #[oai(name = "ruleId")] rule_id: Path<String>,
        body: Json<PushRuleActions>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = serde_json::json!({ "actions": body.0.actions });
        state
            .services
            .account_data
            .set_push_rule_actions(&auth.0.user_id, kind.0.as_str(), &rule_id.0, &body)
            .await?;
        Ok(Json(EmptyResponse {}))
    }
}
