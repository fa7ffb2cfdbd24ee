//! Push rules (`/pushrules`): the user's ruleset, kept as their global `m.push_rules` account
//! data (`{"global": <ruleset>}`), so that a change reaches their clients through `/sync` like
//! any account data. Rule handling (insertion order, `before`/`after`, what may be removed) is
//! ruma's `Ruleset`.
//!
//! A stored ruleset keeps the user's own rules and the server-default ones the user changed
//! (`enabled`, `actions`); the server-default rules themselves are this build's (ruma's),
//! merged in whenever the ruleset is read, so a server upgrade brings its new default rules,
//! and new actions of the ones the user left alone, to every account. An account that never
//! changed a rule has nothing stored and gets the defaults.

use palpo_core::{Error, ErrorCode, Result};
use ruma::{
    OwnedRoomId, OwnedUserId, UserId,
    push::{
        Action, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
        NewSimplePushRule, PushCondition, RemovePushRuleError, RuleKind, Ruleset,
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::AccountDataService;

/// The global account data type that holds the ruleset.
pub const PUSH_RULES: &str = "m.push_rules";

/// The kinds of rules of the `global` scope, as the path names them, in the order of their
/// priority (the order a ruleset's JSON lists them in).
const KINDS: &[&str] = &["override", "content", "room", "sender", "underride"];

/// A rule's kind from the path: one of [`KINDS`], else 400 `M_INVALID_PARAM`.
fn rule_kind(kind: &str) -> Result<RuleKind> {
    if !KINDS.contains(&kind) {
        return Err(Error::invalid_param(format!(
            "Unknown push rule kind {kind:?}: one of {KINDS:?}"
        )));
    }
    Ok(RuleKind::from(kind))
}

fn rule_not_found() -> Error {
    Error::not_found("The push rule was not found")
}

/// The server-default ruleset of `user` (ruma's, which follows the spec's list).
fn server_default(user: &str) -> Result<Ruleset> {
    let user = UserId::parse(user).map_err(Error::internal)?;
    Ok(Ruleset::server_default(&user))
}

/// The ruleset of stored `m.push_rules` content (`None`: nothing stored) with this build's
/// server-default rules; `Err` when the content holds no readable ruleset.
fn merged_ruleset(user: &str, content: Option<Value>) -> Result<Ruleset> {
    let defaults = server_default(user)?;
    let Some(mut content) = content else {
        return Ok(defaults);
    };
    let global = content
        .get_mut("global")
        .map(Value::take)
        .unwrap_or_default();
    let mut ruleset: Ruleset = serde_json::from_value(global)
        .map_err(|e| Error::internal(format!("unreadable stored push rules: {e}")))?;
    ruleset.update_with_server_default(defaults);
    Ok(ruleset)
}

/// As [`merged_ruleset`], for reading: unreadable stored rules are logged and read as the
/// defaults (a write refuses them instead, so that it does not replace what is stored).
pub(crate) fn ruleset_of(user: &str, content: Option<Value>) -> Result<Ruleset> {
    match merged_ruleset(user, content) {
        Ok(ruleset) => Ok(ruleset),
        Err(err) => {
            tracing::warn!(user, error = %err, "push rules read as the defaults");
            server_default(user)
        }
    }
}

/// The user's ruleset, when their stored content holds rules of their own or server-default
/// rules they changed; `None` when it says nothing the defaults do not (say, a rule added and
/// removed again), or cannot be read.
pub(crate) fn custom_ruleset(user: &str, content: Option<Value>) -> Result<Option<Ruleset>> {
    let ruleset = ruleset_of(user, content)?;
    let stored = stored_content(user, &ruleset)?;
    let any_rule = stored["global"].as_object().is_some_and(|kinds| {
        kinds
            .values()
            .any(|rules| rules.as_array().is_some_and(|rules| !rules.is_empty()))
    });
    Ok(any_rule.then_some(ruleset))
}

/// A ruleset as clients see it: every kind present, empty or not (ruma leaves empty ones out;
/// the spec's examples and other servers list all five, and clients index them).
fn ruleset_json(ruleset: &Ruleset) -> Result<Value> {
    let mut value = serde_json::to_value(ruleset).map_err(Error::internal)?;
    if let Value::Object(kinds) = &mut value {
        for kind in KINDS {
            kinds.entry(*kind).or_insert_with(|| json!([]));
        }
    }
    Ok(value)
}

/// The content to store for `ruleset`: the user's rules and the server-default rules whose
/// `enabled` or `actions` differ from this build's defaults (the others are merged in again
/// when read, so they follow the server's defaults as they change).
fn stored_content(user: &str, ruleset: &Ruleset) -> Result<Value> {
    let defaults = serde_json::to_value(server_default(user)?).map_err(Error::internal)?;
    let mut value = serde_json::to_value(ruleset).map_err(Error::internal)?;
    if let Value::Object(kinds) = &mut value {
        for (kind, rules) in kinds.iter_mut() {
            let Value::Array(rules) = rules else {
                continue;
            };
            let default_rules = defaults[kind.as_str()].as_array();
            rules.retain(|rule| {
                let unchanged_default = rule["default"] == true
                    && default_rules.is_some_and(|defaults| {
                        defaults.iter().any(|d| {
                            d["rule_id"] == rule["rule_id"]
                                && d["enabled"] == rule["enabled"]
                                && d["actions"] == rule["actions"]
                        })
                    });
                !unchanged_default
            });
        }
    }
    Ok(json!({ "global": value }))
}

/// The content of an `m.push_rules` account data event as clients get it (in `/sync`, or
/// read as account data): `stored` (or nothing stored) with this build's server-default
/// rules, every kind present.
pub(super) fn client_content(user: &str, stored: Option<Value>) -> Result<Value> {
    Ok(json!({ "global": ruleset_json(&ruleset_of(user, stored)?)? }))
}

/// A field of a request body, as `T`; 400 `M_BAD_JSON` when it is missing or malformed.
fn field<T: DeserializeOwned>(body: &Value, name: &str) -> Result<T> {
    let value = body
        .get(name)
        .ok_or_else(|| Error::bad_json(format!("Missing field {name:?}")))?;
    serde_json::from_value(value.clone())
        .map_err(|e| Error::bad_json(format!("Invalid field {name:?}: {e}")))
}

/// The rule `body` describes, of `kind` and id `rule_id` (`PUT /pushrules/global/...`).
fn new_rule(kind: &RuleKind, rule_id: &str, body: &Value) -> Result<NewPushRule> {
    if !body.is_object() {
        return Err(Error::bad_json("A push rule must be a JSON object"));
    }
    let actions: Vec<Action> = field(body, "actions")?;
    let id = rule_id.to_owned();
    let conditions = || -> Result<Vec<PushCondition>> {
        match body.get("conditions") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => field(body, "conditions"),
        }
    };
    Ok(match kind {
        RuleKind::Override => {
            NewPushRule::Override(NewConditionalPushRule::new(id, conditions()?, actions))
        }
        RuleKind::Underride => {
            NewPushRule::Underride(NewConditionalPushRule::new(id, conditions()?, actions))
        }
        RuleKind::Content => {
            let pattern = field(body, "pattern")?;
            NewPushRule::Content(NewPatternedPushRule::new(id, pattern, actions))
        }
        RuleKind::Room => {
            let room_id = OwnedRoomId::try_from(rule_id)
                .map_err(|_| Error::invalid_param("The id of a room rule must be the room's ID"))?;
            NewPushRule::Room(NewSimplePushRule::new(room_id, actions))
        }
        RuleKind::Sender => {
            let user_id = OwnedUserId::try_from(rule_id).map_err(|_| {
                Error::invalid_param("The id of a sender rule must be the sender's user ID")
            })?;
            NewPushRule::Sender(NewSimplePushRule::new(user_id, actions))
        }
        _ => return Err(rule_not_found()),
    })
}

impl AccountDataService {
    /// The user's ruleset (`GET /pushrules/`, the `global` scope).
    pub async fn push_rules(&self, user: &str) -> Result<Value> {
        let content = self.content(user, None, PUSH_RULES).await?;
        ruleset_json(&ruleset_of(user, content)?)
    }

    /// One rule (`GET /pushrules/global/{kind}/{ruleId}`); 404 `M_NOT_FOUND` when there is
    /// no such rule.
    pub async fn push_rule(&self, user: &str, kind: &str, rule_id: &str) -> Result<Value> {
        rule_kind(kind)?;
        let mut ruleset = self.push_rules(user).await?;
        let rules = match ruleset.get_mut(kind).map(Value::take) {
            Some(Value::Array(rules)) => rules,
            _ => Vec::new(),
        };
        rules
            .into_iter()
            .find(|rule| rule["rule_id"] == rule_id)
            .ok_or_else(rule_not_found)
    }

    /// Adds or replaces a rule of the user's (`PUT /pushrules/global/{kind}/{ruleId}`),
    /// placed `before` or `after` another user-defined rule of its kind, or first of its kind.
    pub async fn set_push_rule(
        &self,
        user: &str,
        kind: &str,
        rule_id: &str,
        body: &Value,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<()> {
        let kind = rule_kind(kind)?;
        let rule = new_rule(&kind, rule_id, body)?;
        self.update_push_rules(user, |ruleset| {
            ruleset
                .insert(rule.clone(), after, before)
                .map_err(|e| match e {
                    InsertPushRuleError::UnknownRuleId => Error::with_status(
                        400,
                        ErrorCode::Unknown,
                        format!(
                            "before/after rule not found: before {:?}, after {:?}",
                            before.unwrap_or_default(),
                            after.unwrap_or_default()
                        ),
                    ),
                    other => Error::invalid_param(other.to_string()),
                })
        })
        .await
    }

    /// Removes a rule of the user's (`DELETE /pushrules/global/{kind}/{ruleId}`): 404 when
    /// the user has no such rule of their own, server-default rules included (the spec's only
    /// error for this; they can be disabled instead).
    pub async fn delete_push_rule(&self, user: &str, kind: &str, rule_id: &str) -> Result<()> {
        let kind = rule_kind(kind)?;
        self.update_push_rules(user, |ruleset| {
            ruleset.remove(kind.clone(), rule_id).map_err(|e| match e {
                RemovePushRuleError::ServerDefault => {
                    Error::not_found("A server-default rule cannot be removed; it can be disabled")
                }
                _ => rule_not_found(),
            })
        })
        .await
    }

    /// Whether a rule is enabled (`GET .../enabled`).
    pub async fn push_rule_enabled(&self, user: &str, kind: &str, rule_id: &str) -> Result<bool> {
        let rule = self.push_rule(user, kind, rule_id).await?;
        Ok(rule["enabled"].as_bool().unwrap_or(true))
    }

    /// Enables or disables a rule (`PUT .../enabled`).
    pub async fn set_push_rule_enabled(
        &self,
        user: &str,
        kind: &str,
        rule_id: &str,
        enabled: bool,
    ) -> Result<()> {
        let kind = rule_kind(kind)?;
        self.update_push_rules(user, |ruleset| {
            ruleset
                .set_enabled(kind.clone(), rule_id, enabled)
                .map_err(|_| rule_not_found())
        })
        .await
    }

    /// A rule's actions (`GET .../actions`).
    pub async fn push_rule_actions(&self, user: &str, kind: &str, rule_id: &str) -> Result<Value> {
        let mut rule = self.push_rule(user, kind, rule_id).await?;
        Ok(rule
            .get_mut("actions")
            .map(Value::take)
            .unwrap_or_else(|| json!([])))
    }

    /// Sets a rule's actions (`PUT .../actions`, body `{"actions": [...]}`); 400 `M_BAD_JSON`
    /// for actions that are not a list of actions.
    pub async fn set_push_rule_actions(
        &self,
        user: &str,
        kind: &str,
        rule_id: &str,
        body: &Value,
    ) -> Result<()> {
        let kind = rule_kind(kind)?;
        let actions: Vec<Action> = field(body, "actions")?;
        self.update_push_rules(user, |ruleset| {
            ruleset
                .set_actions(kind.clone(), rule_id, actions.clone())
                .map_err(|_| rule_not_found())
        })
        .await
    }

    /// Reads the user's ruleset, changes it with `change` and stores it (again on the newer
    /// rules should another change overtake it: see `modify`). Nothing is written when `change`
    /// fails, or when the stored rules cannot be read (a 500: storing the defaults plus the
    /// change would lose the user's rules).
    async fn update_push_rules(
        &self,
        user: &str,
        mut change: impl FnMut(&mut Ruleset) -> Result<()>,
    ) -> Result<()> {
        self.modify(user, None, PUSH_RULES, |content| {
            let mut ruleset = merged_ruleset(user, content)?;
            change(&mut ruleset)?;
            stored_content(user, &ruleset).map(Some)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_the_path() {
        for kind in KINDS {
            assert!(rule_kind(kind).is_ok());
        }
        for bad in ["", "global", "Override", "postcontent"] {
            let err = rule_kind(bad).expect_err(bad);
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn stored_rulesets_get_the_server_defaults() {
        let user = "@alice:example.org";
        // Nothing stored, or content without a readable ruleset: the defaults.
        let defaults = server_default(user).expect("valid user");
        for content in [None, Some(json!({"global": 3}))] {
            let ruleset = ruleset_of(user, content).expect("ruleset");
            assert_eq!(
                serde_json::to_value(&ruleset).ok(),
                serde_json::to_value(&defaults).ok()
            );
        }
        // A stored ruleset keeps its own rules and the state of the default ones, and gains
        // the default rules it lacks.
        let stored = json!({"global": {
            "override": [
                {"rule_id": ".m.rule.master", "default": true, "enabled": true,
                 "conditions": [], "actions": []},
                {"rule_id": "mine", "default": false, "enabled": true,
                 "conditions": [], "actions": ["notify"]},
            ],
        }});
        let ruleset = ruleset_of(user, Some(stored)).expect("ruleset");
        let value = serde_json::to_value(&ruleset).expect("serializes");
        let overrides = value["override"].as_array().expect("override rules");
        let rule = |id: &str| overrides.iter().find(|r| r["rule_id"] == id).cloned();
        assert_eq!(rule(".m.rule.master").expect("master")["enabled"], true);
        assert!(rule("mine").is_some());
        assert!(rule(".m.rule.suppress_notices").is_some());
        assert!(value["underride"].as_array().is_some_and(|u| !u.is_empty()));
    }

    #[test]
    fn stored_rules_leave_out_the_untouched_defaults() {
        let user = "@alice:example.org";
        let stored_ids = |ruleset: &Ruleset| -> Vec<String> {
            let content = stored_content(user, ruleset).expect("content");
            let mut ids: Vec<String> = KINDS
                .iter()
                .flat_map(|kind| {
                    content["global"][*kind]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|rule| rule["rule_id"].as_str().unwrap_or_default().to_owned())
                .collect();
            ids.sort();
            ids
        };
        let mut ruleset = server_default(user).expect("defaults");
        assert!(stored_ids(&ruleset).is_empty());
        ruleset
            .set_enabled(RuleKind::Override, ".m.rule.master", true)
            .expect("master");
        let rule = new_rule(&RuleKind::Override, "mine", &json!({"actions": []})).expect("rule");
        ruleset.insert(rule, None, None).expect("inserted");
        assert_eq!(stored_ids(&ruleset), [".m.rule.master", "mine"]);
        // Read back, the defaults are all there again, the changed one as changed.
        let content = stored_content(user, &ruleset).expect("content");
        let read = ruleset_json(&ruleset_of(user, Some(content)).expect("read")).expect("json");
        assert_eq!(read, ruleset_json(&ruleset).expect("json"));
        assert_eq!(read["override"][0]["enabled"], true);
        for kind in KINDS {
            assert!(read[*kind].is_array(), "{kind}: {read}");
        }
        // Only the user's rules and changed defaults make a ruleset their own.
        assert!(custom_ruleset(user, None).expect("read").is_none());
        let defaults_only = stored_content(user, &server_default(user).expect("defaults"));
        assert!(
            custom_ruleset(user, defaults_only.ok())
                .expect("read")
                .is_none()
        );
        let own = stored_content(user, &ruleset).expect("content");
        assert!(custom_ruleset(user, Some(own)).expect("read").is_some());
        // Unreadable stored rules: read as the defaults, refused for a change.
        let bad = Some(json!({"global": {"override": 3}}));
        assert!(merged_ruleset(user, bad.clone()).is_err());
        assert!(ruleset_of(user, bad).is_ok());
    }

    #[test]
    fn rules_from_request_bodies() {
        let notify = json!({"actions": ["notify"]});
        assert!(new_rule(&RuleKind::Override, "x", &notify).is_ok());
        assert!(
            new_rule(
                &RuleKind::Underride,
                "x",
                &json!({"actions": [], "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.x"}]})
            )
            .is_ok()
        );
        // A content rule needs its pattern; room and sender rules are named by their ids.
        let err = new_rule(&RuleKind::Content, "x", &notify).expect_err("no pattern");
        assert_eq!(err.code(), ErrorCode::BadJson);
        assert!(
            new_rule(
                &RuleKind::Content,
                "x",
                &json!({"actions": [], "pattern": "cake*"})
            )
            .is_ok()
        );
        assert!(new_rule(&RuleKind::Room, "!r:x", &notify).is_ok());
        assert_eq!(
            new_rule(&RuleKind::Room, "r", &notify)
                .expect_err("not a room")
                .status(),
            400
        );
        assert!(new_rule(&RuleKind::Sender, "@u:x", &notify).is_ok());
        assert_eq!(
            new_rule(&RuleKind::Sender, "u", &notify)
                .expect_err("not a user")
                .status(),
            400
        );
        // Missing or malformed actions, a body that is not an object.
        for body in [
            json!({}),
            json!({"actions": "notify"}),
            json!([]),
            json!({"actions": [], "conditions": 1}),
        ] {
            let err = new_rule(&RuleKind::Override, "x", &body).expect_err("bad body");
            assert_eq!(err.code(), ErrorCode::BadJson, "{body}");
        }
    }
}
