//! Logging in to the dashboard: the admin token, presented once through the
//! login form, becomes an `HttpOnly`, `SameSite=Strict` session cookie.
//!
//! The cookie holds [`Token::session_value`], a digest of the token, never
//! the token: it stays valid across coordinator restarts (so an open page
//! reconnects by itself) and until the token is changed. Both the token and
//! the cookie are compared in constant time. Without an admin token every
//! request is admitted and the login page sends the browser to `/`.

use axum::{
    Form,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use tracing::{info, warn};

use super::{Dashboard, json_error};
use crate::auth::{self, Token};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "muster_session";

const LOGIN_HTML: &str = include_str!("assets/login.html");
/// Where the login page shows why the last attempt failed.
const LOGIN_ERROR_SLOT: &str = "<!--error-->";

/// Whether a request may see the fleet: no token is required, or it carries
/// the session cookie, or the token itself as `Authorization: Bearer`.
pub fn admitted(required: Option<&Token>, headers: &HeaderMap) -> bool {
    let Some(token) = required else {
        return true;
    };
    if session_cookie(headers).is_some_and(|value| token.accepts_session(value.as_bytes())) {
        return true;
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    authorization.is_some() && auth::require_admin_token(Some(token), authorization).is_ok()
}

/// The 401 answer of the JSON and event routes.
pub fn unauthorized() -> Response {
    metrics::counter!("muster_admin_requests_refused_total").increment(1);
    json_error(
        StatusCode::UNAUTHORIZED,
        "this coordinator requires the admin token: log in at /login, or send Authorization: Bearer <token>",
    )
}

/// The value of the session cookie, when the request carries one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| cookie.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

pub async fn login_page(State(dashboard): State<Dashboard>) -> Response {
    if dashboard.admin_token.is_none() {
        return Redirect::to("/").into_response();
    }
    Html(LOGIN_HTML).into_response()
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

pub async fn log_in(State(dashboard): State<Dashboard>, Form(login): Form<Login>) -> Response {
    let Some(required) = dashboard.admin_token.as_ref() else {
        return Redirect::to("/").into_response();
    };
    if !required.accepts(login.token.trim().as_bytes()) {
        metrics::counter!("muster_admin_requests_refused_total").increment(1);
        warn!("refused a dashboard login: wrong admin token");
        let page = LOGIN_HTML.replace(
            LOGIN_ERROR_SLOT,
            r#"<p class="error" role="alert">That is not this coordinator's admin token.</p>"#,
        );
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    info!("dashboard login");
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        required.session_value()
    );
    with_cookie(Redirect::to("/").into_response(), &cookie)
}

pub async fn log_out() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    with_cookie(Redirect::to("/login").into_response(), &cookie)
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn headers(pairs: &[(header::HeaderName, String)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), HeaderValue::from_str(value).unwrap()))
            .collect()
    }

    #[test]
    fn the_session_cookie_or_the_bearer_token_admits_and_nothing_else_does() {
        let token = Token::new("t", TOKEN).unwrap();
        let session = token.session_value();
        assert!(admitted(None, &HeaderMap::new()));
        assert!(!admitted(Some(&token), &HeaderMap::new()));
        assert!(admitted(
            Some(&token),
            &headers(&[(
                header::COOKIE,
                format!("theme=dark; {SESSION_COOKIE}={session}")
            )])
        ));
        assert!(!admitted(
            Some(&token),
            &headers(&[(header::COOKIE, format!("{SESSION_COOKIE}={TOKEN}"))])
        ));
        assert!(!admitted(
            Some(&token),
            &headers(&[(header::COOKIE, format!("other_{SESSION_COOKIE}={session}"))])
        ));
        assert!(admitted(
            Some(&token),
            &headers(&[(header::AUTHORIZATION, format!("Bearer {TOKEN}"))])
        ));
        assert!(!admitted(
            Some(&token),
            &headers(&[(header::AUTHORIZATION, format!("Bearer {session}"))])
        ));
    }
}
