//! Push rules over HTTP (`/pushrules`), on every backend with and without Redis: an account
//! starts with the server-default ruleset, in `GET /pushrules/` and in the initial sync's
//! `m.push_rules` account data; rules are added, placed, enabled, given actions and removed as
//! the spec says, with its errors; a change reaches `/sync` (and wakes a long-poll), and one
//! user's rules are not another's.

use std::time::{Duration, Instant};

use palpo_tests::{TestApp, backend_matrix, enc, long_poll, next_batch, sync};
use serde_json::{Value, json};

const RULES: &str = "/_matrix/client/v3/pushrules/";

fn rule_path(kind: &str, rule_id: &str, rest: &str) -> String {
    format!("{RULES}global/{kind}/{}{rest}", enc(rule_id))
}

/// The ids of the rules of `kind` in a ruleset, in priority order.
fn ids(ruleset: &Value, kind: &str) -> Vec<String> {
    ruleset[kind]
        .as_array()
        .into_iter()
        .flatten()
        .map(|rule| rule["rule_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The `m.push_rules` content in a sync response's global account data, if any.
fn synced_rules(response: &Value) -> Option<Value> {
    response["account_data"]["events"]
        .as_array()?
        .iter()
        .find(|event| event["type"] == "m.push_rules")
        .map(|event| event["content"].clone())
}

backend_matrix!(push_rules, push_rules_scenario);

async fn push_rules_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());

    // The server's defaults, also in the initial sync.
    let defaults = app.get(RULES, Some(a)).await.expect_ok().clone();
    let global = &defaults["global"];
    for kind in ["override", "content", "room", "sender", "underride"] {
        assert!(global[kind].is_array(), "every kind is listed: {global}");
    }
    assert_eq!(ids(global, "override")[0], ".m.rule.master");
    assert_eq!(global["override"][0]["enabled"], false);
    assert_eq!(global["override"][0]["default"], true);
    assert!(ids(global, "override").contains(&".m.rule.suppress_notices".to_owned()));
    assert!(ids(global, "underride").contains(&".m.rule.message".to_owned()));
    assert_eq!(
        app.get(&format!("{RULES}global/"), Some(a))
            .await
            .expect_ok(),
        global
    );
    let initial = sync(app, a, None, 0).await;
    assert_eq!(
        synced_rules(&initial).as_ref(),
        Some(&defaults),
        "{initial}"
    );
    let as_account_data = format!(
        "/_matrix/client/v3/user/{}/account_data/m.push_rules",
        enc(&alice.user_id)
    );
    assert_eq!(
        app.get(&as_account_data, Some(a)).await.expect_ok(),
        &defaults
    );
    let since = next_batch(&initial);
    let master = app
        .get(&rule_path("override", ".m.rule.master", ""), Some(a))
        .await
        .expect_ok()
        .clone();
    assert_eq!(master["rule_id"], ".m.rule.master");
    assert_eq!(master["actions"], json!([]));

    // A rule of Alice's own, and one placed before it.
    let cake = json!({
        "actions": ["notify", {"set_tweak": "sound", "value": "default"}],
        "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "cake*"}],
    });
    app.put(&rule_path("override", "cake", ""), Some(a), cake.clone())
        .await
        .expect_ok();
    let rule = app
        .get(&rule_path("override", "cake", ""), Some(a))
        .await
        .expect_ok()
        .clone();
    assert_eq!(rule["actions"], cake["actions"]);
    assert_eq!(rule["conditions"], cake["conditions"]);
    assert_eq!(
        (&rule["enabled"], &rule["default"]),
        (&json!(true), &json!(false))
    );
    app.put(
        &format!("{}?before=cake", rule_path("override", "pie", "")),
        Some(a),
        json!({"actions": []}),
    )
    .await
    .expect_ok();
    let global = app.get(RULES, Some(a)).await.expect_ok()["global"].clone();
    let overrides = ids(&global, "override");
    assert_eq!(
        &overrides[..3],
        [".m.rule.master", "pie", "cake"],
        "{overrides:?}"
    );
    // The default rules are still there, after the user's.
    assert!(overrides.contains(&".m.rule.suppress_notices".to_owned()));

    // Room, sender and content rules, named as the spec says.
    let room_id = "!somewhere:test.local";
    app.put(
        &rule_path("room", room_id, ""),
        Some(a),
        json!({"actions": []}),
    )
    .await
    .expect_ok();
    assert_eq!(
        app.get(&rule_path("room", room_id, ""), Some(a))
            .await
            .expect_ok()["rule_id"],
        room_id
    );
    app.put(
        &rule_path("sender", &bob.user_id, ""),
        Some(a),
        json!({"actions": ["notify"]}),
    )
    .await
    .expect_ok();
    app.put(
        &rule_path("content", "cheese", ""),
        Some(a),
        json!({"actions": ["notify"], "pattern": "cheese"}),
    )
    .await
    .expect_ok();
    assert_eq!(
        app.get(&rule_path("content", "cheese", ""), Some(a))
            .await
            .expect_ok()["pattern"],
        "cheese"
    );

    // Enabling and actions, of the user's rules and of the server's.
    let enabled = rule_path("override", ".m.rule.master", "/enabled");
    assert_eq!(
        app.get(&enabled, Some(a)).await.expect_ok(),
        &json!({"enabled": false})
    );
    app.put(&enabled, Some(a), json!({"enabled": true}))
        .await
        .expect_ok();
    assert_eq!(
        app.get(&enabled, Some(a)).await.expect_ok(),
        &json!({"enabled": true})
    );
    let actions = rule_path("override", "cake", "/actions");
    app.put(&actions, Some(a), json!({"actions": ["notify"]}))
        .await
        .expect_ok();
    assert_eq!(
        app.get(&actions, Some(a)).await.expect_ok(),
        &json!({"actions": ["notify"]})
    );
    // Replacing a rule keeps whether it is enabled.
    let cake_enabled = rule_path("override", "cake", "/enabled");
    app.put(&cake_enabled, Some(a), json!({"enabled": false}))
        .await
        .expect_ok();
    app.put(&rule_path("override", "cake", ""), Some(a), cake.clone())
        .await
        .expect_ok();
    assert_eq!(
        app.get(&cake_enabled, Some(a)).await.expect_ok(),
        &json!({"enabled": false})
    );

    // Deleting: the user's rules only.
    app.delete(&rule_path("override", "pie", ""), Some(a), None)
        .await
        .expect_ok();
    app.get(&rule_path("override", "pie", ""), Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.delete(&rule_path("override", "pie", ""), Some(a), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.delete(&rule_path("override", ".m.rule.master", ""), Some(a), None)
        .await
        .expect_error(404, "M_NOT_FOUND");

    // The spec's errors, and nothing stored changes.
    let before_errors = app.get(RULES, Some(a)).await.expect_ok().clone();
    let notify = json!({"actions": ["notify"]});
    app.put(
        &rule_path("override", ".m.rule.mine", ""),
        Some(a),
        notify.clone(),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    app.put(
        &format!("{}?after=nothing", rule_path("override", "x", "")),
        Some(a),
        notify.clone(),
    )
    .await
    .expect_error(400, "M_UNKNOWN");
    app.put(
        &rule_path("room", "not-a-room", ""),
        Some(a),
        notify.clone(),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    app.put(&rule_path("content", "x", ""), Some(a), notify.clone())
        .await
        .expect_error(400, "M_BAD_JSON");
    app.put(&rule_path("override", "x", ""), Some(a), json!({}))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.put(
        &rule_path("override", "x", ""),
        Some(a),
        json!({"actions": [], "conditions": "none"}),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    app.put(&rule_path("bogus", "x", ""), Some(a), notify.clone())
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.get(&rule_path("override", "x", "/enabled"), Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.put(
        &rule_path("override", "x", "/enabled"),
        Some(a),
        json!({"enabled": true}),
    )
    .await
    .expect_error(404, "M_NOT_FOUND");
    app.put(&enabled, Some(a), json!({"enabled": "yes"}))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.put(&actions, Some(a), json!({"actions": "notify"}))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.get(RULES, None)
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    assert_eq!(
        app.get(RULES, Some(a)).await.expect_ok(),
        &before_errors,
        "a refused change stores nothing"
    );

    // The changes reach Alice's incremental sync, as her whole ruleset, and not Bob's.
    let changed = sync(app, a, Some(&since), 0).await;
    assert_eq!(
        synced_rules(&changed).as_ref(),
        Some(&before_errors),
        "{changed}"
    );
    let bobs = app.get(RULES, Some(b)).await.expect_ok()["global"].clone();
    assert_eq!(bobs["override"][0]["enabled"], false, "{bobs}");
    assert!(
        !ids(&bobs, "override").contains(&"cake".to_owned()),
        "{bobs}"
    );
    assert!(ids(&bobs, "room").is_empty(), "{bobs}");
    let bobs_sync = sync(app, b, None, 0).await;
    assert_eq!(
        synced_rules(&bobs_sync).map(|r| r["global"].clone()),
        Some(bobs)
    );

    // A change wakes a long-poll.
    let since = next_batch(&changed);
    let started = Instant::now();
    let poll = long_poll(app, a, &since, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the sync waits while nothing happens");
    app.put(&enabled, Some(a), json!({"enabled": false}))
        .await
        .expect_ok();
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    let rules = synced_rules(&woke).unwrap_or_else(|| panic!("no push rules in {woke}"));
    assert_eq!(rules["global"]["override"][0]["enabled"], false);
    assert_eq!(
        app.get(&as_account_data, Some(a)).await.expect_ok(),
        &rules,
        "read as account data, the rules are those /sync shows"
    );

    // Stored rules that cannot be read: read as the defaults, but a change is refused rather
    // than storing the defaults over them.
    let unreadable = r#"{"global":{"override":3}}"#;
    app.storage()
        .account_data
        .put_account_data(&bob.user_id, None, "m.push_rules", unreadable)
        .await
        .expect("stored");
    let bobs = app.get(RULES, Some(b)).await.expect_ok()["global"].clone();
    assert_eq!(ids(&bobs, "override")[0], ".m.rule.master");
    app.put(
        &rule_path("override", "x", ""),
        Some(b),
        json!({"actions": []}),
    )
    .await
    .expect_status(500);
    let kept = app
        .storage()
        .account_data
        .get_account_data(&bob.user_id, None, "m.push_rules")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(kept.content, unreadable);
}
