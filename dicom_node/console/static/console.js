// Refresh the worklist's rows in place (no page reload) while the page is open.
(function () {
  var body = document.getElementById("worklist-rows");
  if (!body) { return; }
  var interval = parseInt(body.getAttribute("data-interval"), 10) || 3000;
  var stamp = document.getElementById("refreshed");
  function refresh() {
    fetch(body.getAttribute("data-source"), {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("status " + response.status); }
        return response.text();
      })
      .then(function (html) {
        body.innerHTML = html;
        if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (error) {
        if (stamp) { stamp.textContent = "refresh failed (" + error.message + "); log in again if the session ended"; }
      });
  }
  window.setInterval(refresh, interval);
})();
