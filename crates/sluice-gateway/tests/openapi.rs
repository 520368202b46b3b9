//! docs/openapi.json and the router agree: every documented operation is
//! routed, and every route is documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::Method;
use serde_json::Value;
use support::*;

const SPEC: &str = include_str!("../../../docs/openapi.json");
const ROUTES: &str = include_str!("../src/routes.rs");

fn concrete(path: &str) -> String {
    path.replace("{subject}", "user:1")
        .replace("{address}", "agent://a/b/c")
        .replace("{id}", "x")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let dir = TempDir::new("openapi");
    let s = Server::start(&dir).await;
    for (path, item) in paths {
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = s.admin(m, &concrete(path), None).await;
            let kind = r.body["error"]["type"].as_str().unwrap_or("");
            let routed = !(kind == "method_not_allowed"
                || (kind == "not_found"
                    && r.body["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("no route")));
            assert!(
                routed,
                "{method} {path} is documented but not routed: {:?}",
                r.body
            );
        }
    }
    // Every `.route("...")` in the router is a documented path.
    let mut routes = 0;
    for (i, _) in ROUTES.match_indices(".route(") {
        let after = ROUTES[i + ".route(".len()..].trim_start();
        let Some(route) = after.strip_prefix('"').and_then(|r| r.split('"').next()) else {
            continue;
        };
        routes += 1;
        let documented = route
            .replace("{*subject}", "{subject}")
            .replace("{*rest}", "{address}/policies/cost");
        assert!(
            paths.contains_key(&documented),
            "route {route} is not in docs/openapi.json"
        );
    }
    assert!(routes >= 12, "found only {routes} routes in routes.rs");
    s.stop().await;
}
