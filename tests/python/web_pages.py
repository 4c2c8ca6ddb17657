"""Drives the consent page and the enterprise console in Debian's Chromium
with Playwright, as a subscriber, an enterprise and the operator would.

Started by tests/tests/web.rs, which owns the hub. The two talk in JSON
lines: this script prints a line when it needs something from the hub (the
sign-in code that reached the phone) or has reached a step the test checks
against the hub (the stored profile, GetMessage, GetStats), and waits for
the test's answer on stdin. Every page is screenshot and checked with
axe-core; a serious or critical violation fails the run.
"""

import argparse
import json
import os
import re
import sys
import time

from playwright.sync_api import expect, sync_playwright

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def ask(message):
    """Tells the test where we are and returns its answer."""
    print(json.dumps(message), flush=True)
    answer = json.loads(sys.stdin.readline())
    if not answer.get("ok", True):
        raise SystemExit(f"the test refused step {message}: {answer}")
    return answer


class Pages:
    def __init__(self, args, axe_source):
        self.args = args
        self.axe_source = axe_source
        self.violations = {}
        os.makedirs(args.screenshots, exist_ok=True)

    def check(self, page, name):
        """Screenshot, then axe-core's WCAG 2 A/AA rules on the page as shown."""
        page.screenshot(path=os.path.join(self.args.screenshots, f"{name}.png"), full_page=True)
        page.add_script_tag(content=self.axe_source)
        result = page.evaluate(
            """async () => {
                const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
                return r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help}));
            }"""
        )
        serious = [v for v in result if v["impact"] in ("serious", "critical")]
        if serious:
            self.violations[name] = serious
        for v in result:
            print(f"axe {name}: {v['impact']} {v['id']} ({v['nodes']}): {v['help']}", file=sys.stderr)


def funnel_numbers(page):
    numbers = {}
    for cell in page.locator("td[data-step]").all():
        numbers[cell.get_attribute("data-step")] = int(cell.inner_text())
    return numbers


def subscriber(pages, browser):
    args = pages.args
    # A phone-sized screen, in Japanese first.
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="ja-JP",
        bypass_csp=True,
    )
    page = context.new_page()
    page.goto(args.consent_url + "/")
    expect(page.locator("html")).to_have_attribute("lang", "ja")
    expect(page.get_by_role("heading", level=1)).to_have_text("ログイン")
    pages.check(page, "consent-sign-in-ja")
    page.get_by_role("link", name="English").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")

    # Keyboard only: Tab to the phone field, type the number as people write it, Enter.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "phone":
            break
    else:
        raise SystemExit("the phone field cannot be reached with Tab")
    page.keyboard.type(args.phone_local)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Enter your code")
    pages.check(page, "consent-code")
    # A wrong code is refused and says so.
    page.get_by_label("One-time code").fill("000000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    code = ask({"need": "code"})["code"]
    page.get_by_label("One-time code").fill(code)
    page.get_by_role("button", name="Sign in").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Enterprises you share with")
    row = page.get_by_role("row").filter(has_text=args.enterprise_name)
    expect(row).to_contain_text("Age: 36")
    pages.check(page, "consent-overview")

    # Narrow the age from the exact age to the decade, previewing first.
    row.get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(args.enterprise_name)
    page.get_by_role("group", name="Age").get_by_label("Only the decade").check()
    pages.check(page, "consent-enterprise")
    page.get_by_role("button", name="Preview").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Check before you confirm")
    expect(page.locator("dl.profile")).to_contain_text("30–39")
    expect(page.locator(".card")).to_contain_text(args.enterprise_name + " will be able to choose you")
    expect(page.locator(".card")).to_contain_text("age: 30–39")
    pages.check(page, "consent-preview")
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("status")).to_contain_text("Saved")
    expect(page.locator("dl.profile")).to_contain_text("30–39")
    ask({"step": "narrowed"})

    # Withdraw: share nothing.
    page.get_by_role("button", name="Withdraw: share nothing").click()
    expect(page.get_by_role("status")).to_contain_text("Saved")
    expect(page.get_by_text("Nothing beyond your registration")).to_be_visible()
    ask({"step": "withdrew"})

    page.get_by_role("link", name="Your history").click()
    history = page.locator("table")
    expect(history).to_contain_text("Withdrew")
    expect(history).to_contain_text("Changed what you share")
    expect(history).to_contain_text("Registered")
    pages.check(page, "consent-history")

    # A form posted without this session's token changes nothing.
    response = page.request.post(
        args.consent_url + f"/enterprises/{args.enterprise}/consent",
        form={"csrf": "forged", "gender": "share", "age": "exact", "region": "city",
              "occupation": "share", "text_version": "x"},
    )
    if "expired" not in response.text():
        raise SystemExit("a forged consent form was not refused")

    # Leave the enterprise, then the whole hub.
    page.get_by_role("link", name="Enterprises you share with").click()
    page.get_by_role("row").filter(has_text=args.enterprise_name).get_by_role("link").click()
    page.get_by_role("button", name="Leave this enterprise").click()
    expect(page.get_by_role("status")).to_contain_text("You left the enterprise")
    expect(page.get_by_text("You are not registered with any enterprise through us.")).to_be_visible()
    ask({"step": "left"})
    page.get_by_label("I want to leave every enterprise").check()
    page.get_by_role("button", name="Leave the hub").click()
    expect(page.get_by_role("status")).to_contain_text("You left the hub")
    page.get_by_role("link", name="Your history").click()
    expect(page.locator("table")).to_contain_text("Left the hub")
    ask({"step": "left_hub"})

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    context.close()


def enterprise(pages, browser):
    args = pages.args
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.goto(args.console_url + "/console")
    pages.check(page, "console-sign-in")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API key").fill(args.api_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Messages")
    pages.check(page, "console-messages")

    # Compose, see the quote, send.
    page.get_by_role("link", name="New message").first.click()
    page.get_by_label("Everyone registered with you").check()
    page.get_by_label("Text (content.text)").fill("Winter sale: 20% off this weekend")
    page.get_by_label("Channels, in order").fill("sms")
    pages.check(page, "console-compose")
    page.get_by_role("button", name="Quote").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Quote")
    recipients = int(page.locator("#recipients").inner_text())
    ask({"step": "quoted", "recipients": recipients})
    pages.check(page, "console-quote")
    page.get_by_role("button", name=re.compile("^Send to")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Message")
    message_id = page.locator("code").first.inner_text()

    # Watch the funnel move until everyone matched has opened.
    deadline = time.time() + 60
    numbers = funnel_numbers(page)
    while not (numbers.get("Matched", 0) > 0 and numbers.get("Opened") == numbers.get("Matched")):
        if time.time() > deadline:
            raise SystemExit(f"the funnel did not reach everyone: {numbers}")
        time.sleep(0.5)
        page.reload()
        numbers = funnel_numbers(page)
    by_channel = {}
    for row in page.locator("#by-channel tbody tr").all():
        cells = [c.inner_text() for c in row.locator("th, td").all()]
        by_channel[cells[0]] = [int(cells[1]), int(cells[2]), int(cells[3])]
    ask({"step": "funnel", "message_id": message_id, "numbers": numbers, "by_channel": by_channel})
    pages.check(page, "console-message")

    # Explain one recipient (the ref is posted, never in a URL).
    page.get_by_label(re.compile("^Ref")).fill(args.user_ref)
    page.get_by_role("button", name="Explain").click()
    expect(page.locator("#trace")).to_contain_text("handed_over")
    if args.user_ref in page.url:
        raise SystemExit("a ref went into a URL")
    pages.check(page, "console-explain")

    page.get_by_role("link", name="Open rates").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Open rates")
    stats = {}
    for row in page.locator("#by-channel tbody tr").all():
        cells = [c.inner_text() for c in row.locator("th, td").all()]
        stats[cells[0]] = [int(cells[1]), int(cells[2]), int(cells[3])]
    ask({"step": "stats", "by_channel": stats, "zone": page.locator("#zone").input_value()})
    pages.check(page, "console-stats")

    page.get_by_role("link", name="Statement").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Statement for")
    pages.check(page, "console-statement")
    page.get_by_role("link", name="Auction").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Auction")
    pages.check(page, "console-auction")

    # Another enterprise's message is not found, whatever the URL.
    response = page.goto(args.console_url + f"/console/messages/{args.other_message_id}")
    if response.status != 404:
        raise SystemExit(f"another enterprise's message answered {response.status}")
    # A form without this session's token is refused.
    response = page.request.post(args.console_url + "/console/quote", form={"csrf": "forged", "target": "all", "text": "x"})
    if response.status != 403:
        raise SystemExit(f"a forged console form answered {response.status}")
    context.close()


def operator(pages, browser):
    args = pages.args
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.goto(args.console_url + "/console")
    page.get_by_label("API key").fill(args.operator_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Carriers and revenue")
    expect(page.locator("#carriers")).to_contain_text("alpha")
    pages.check(page, "console-operator")
    # The operator has no enterprise pages.
    page.goto(args.console_url + "/console/messages")
    expect(page.get_by_role("heading", level=1)).to_have_text("Carriers and revenue")
    context.close()


def main():
    parser = argparse.ArgumentParser()
    for name in ["chromium", "axe", "screenshots", "consent-url", "console-url", "phone-local",
                 "enterprise", "enterprise-name", "api-key", "operator-token", "other-message-id", "user-ref"]:
        parser.add_argument("--" + name, required=True)
    args = parser.parse_args()
    with open(args.axe, encoding="utf-8") as f:
        axe_source = f.read()
    pages = Pages(args, axe_source)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=LAUNCH_ARGS)
        subscriber(pages, browser)
        enterprise(pages, browser)
        operator(pages, browser)
        browser.close()
    print(json.dumps({"step": "done", "violations": pages.violations}), flush=True)


if __name__ == "__main__":
    main()
